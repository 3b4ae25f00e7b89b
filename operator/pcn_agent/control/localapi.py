"""The agent's local API server: the unix socket the CNI plugin talks to
(the protocol and its client are pcn_agent.cni.localapi) and the handler that
turns attach/detach/check/status/gc requests into node data-plane calls.

The socket is mode 0600 and root peers only, checked again with SO_PEERCRED;
one JSON request line and one JSON response line per connection, except for
streaming ops (`capture`, pcn_agent.control.captureproto; `flows`, which
sends progress lines while the data plane is busy; `cni`, CniService), whose
handler keeps the connection and answers on it for as long as the stream
lasts.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcn_agent.cni import commands as cni_commands
from pcn_agent.cni import rtnl
from pcn_agent.cni.localapi import MAX_LINE, AgentError, read_line
from pcn_agent.cni.spec import (
    DECODE_FAILURE,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    IO_FAILURE,
    PORT_CONFLICT,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
)

if TYPE_CHECKING:
    from pcn_agent.cni.localapi import Request, Response
    from pcn_agent.node.wiring import NodeDataplane, Pod

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 5.0  # a client has this long to send its request
LINGER_S = 1.0  # after answering, how long a client may go on sending before we close

Handler = Callable[["Request"], "Response"]
# A streaming op (`capture`): gets the request and the connection, answers on
# it itself for as long as it likes, and returns when it is done (the server
# then closes the connection).
StreamHandler = Callable[["Request", socket.socket], None]


class ApiError(Exception):
    """A request the handler refuses: becomes {"ok": false, ...}."""

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------- server
class LocalApiServer:
    """Serve `handler` on a root-only unix socket, in a background thread."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler,
                 allowed_uids: frozenset[int] = frozenset({0}),
                 streams: Mapping[str, StreamHandler] | None = None) -> None:
        self.path = Path(path)
        self.handler = handler
        self.streams = dict(streams or {})
        self.allowed_uids = allowed_uids
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()
        self._inode: tuple[int, int] | None = None

    def start(self) -> LocalApiServer:
        if self._thread is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(128)
        except BaseException:
            sock.close()
            self._unlink_own()
            raise
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name=f"localapi:{self.path.name}",
                                        daemon=True)
        self._thread.start()
        log.info("local API listening on %s", self.path)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let running requests finish, remove the socket file."""
        if self._thread is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        self._thread = None
        with self._workers_lock:
            workers = list(self._workers)
        for w in workers:
            w.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r, self._wake_w = -1, -1
        self._unlink_own()
        log.info("local API on %s stopped", self.path)

    def __enter__(self) -> LocalApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- internals
    def _remove_stale(self) -> None:
        """A socket file nobody answers on is a dead agent's: remove it. A live
        one, or a file that is not a socket, is left alone (and start fails)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeError(f"{self.path} exists and is not a socket; remove it or choose "
                               f"another socket path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", self.path)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        except OSError:
            pass
        finally:
            probe.close()
        raise RuntimeError(f"another process serves {self.path}: is a pcn agent already running "
                           f"on this node?")

    def _unlink_own(self) -> None:
        """Remove the socket file if it is still the one this server bound."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if self._inode is None or (st.st_dev, st.st_ino) == self._inode:
            os.unlink(self.path)

    def _serve(self) -> None:
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    try:
                        conn, _addr = self._sock.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                            continue
                        log.exception("local API accept failed")
                        return
                    worker = threading.Thread(target=self._connection, args=(conn,),
                                              name="localapi-conn", daemon=True)
                    with self._workers_lock:
                        self._workers.add(worker)
                    worker.start()
        finally:
            sel.close()

    def _connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(READ_TIMEOUT_S)
                response = self._answer(conn)
                if response is None:  # a streaming op served the connection itself
                    return
                try:
                    conn.sendall(json.dumps(response, separators=(",", ":")).encode() + b"\n")
                except OSError as exc:
                    log.warning("local API: client went away before the answer: %s", exc)
                    return
                _linger(conn)
        finally:
            with self._workers_lock:
                self._workers.discard(threading.current_thread())

    def _answer(self, conn: socket.socket) -> Response | None:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid not in self.allowed_uids:
            log.warning("local API: refused pid %d uid %d", pid, uid)
            return _error(f"permission denied: the pcn agent's local API serves root only "
                          f"(peer uid {uid})", INTERNAL)
        try:
            line = read_line(conn)
        except TimeoutError:
            return _error(f"no request line within {READ_TIMEOUT_S:g} s", DECODE_FAILURE)
        except ValueError as exc:
            return _error(f"request too long: {exc}", DECODE_FAILURE)
        except OSError as exc:
            return _error(f"reading the request failed: {exc}", IO_FAILURE)
        try:
            request = json.loads(line)
        except ValueError as exc:
            return _error(f"request is not JSON ({exc}); send one JSON object per line",
                          DECODE_FAILURE)
        if not isinstance(request, dict):
            return _error("request must be a JSON object with an \"op\"", DECODE_FAILURE)
        stream = self.streams.get(str(request.get("op")))
        if stream is not None:
            try:
                conn.settimeout(None)  # the stream sets the timeouts it needs
                stream(request, conn)
            except Exception:
                log.exception("local API stream %s failed", request.get("op"))
            return None
        try:
            result = self.handler(request)
        except ApiError as exc:
            log.info("local API %s refused: %s", request.get("op"), exc)
            return _error(str(exc), exc.code)
        except Exception as exc:
            log.exception("local API %s failed", request.get("op"))
            return _error(f"{request.get('op')} failed in the agent: {exc}", INTERNAL)
        return {"ok": True, **result}


def _linger(conn: socket.socket) -> None:
    """Close only after the client is done sending (or LINGER_S passed): an
    answer given before the request was read in full (a refused peer, a
    request too long) would otherwise make the client's own send fail with
    EPIPE instead of letting it read the answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(LINGER_S)
        drained = 0
        while drained <= MAX_LINE:
            chunk = conn.recv(65536)
            if not chunk:
                return
            drained += len(chunk)
    except OSError:
        pass  # reset or timed out: closing is all that is left


def _error(message: str, code: int) -> Response:
    return {"ok": False, "error": message, "code": code}


# ------------------------------------------------------------------- handler
def _str_field(request: Request, name: str, required: bool = True, default: str = "") -> str:
    value = request.get(name, None)
    if value is None or value == "":
        if required:
            raise ApiError(f"request field {name!r} is missing", INVALID_ENV)
        return default
    if not isinstance(value, str):
        raise ApiError(f"request field {name!r} must be a string", INVALID_ENV)
    return value


def _port_mappings(request: Request) -> list[dict[str, Any]]:
    """The attach request's `port_mappings` (CNI runtimeConfig.portMappings,
    as pcn-cni checked and normalised them: hostPort and containerPort
    integers, protocol "tcp" or "udp", hostIP a string, "" for none)."""
    value = request.get("port_mappings") or []
    if not isinstance(value, list):
        raise ApiError("request field 'port_mappings' must be a list", INVALID_ENV)
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise ApiError("each of 'port_mappings' must be an object", INVALID_ENV)
        host_port, container_port = m.get("hostPort"), m.get("containerPort")
        proto, host_ip = m.get("protocol", "tcp"), m.get("hostIP") or ""
        if not all(isinstance(p, int) and not isinstance(p, bool)
                   for p in (host_port, container_port)) or \
                not isinstance(proto, str) or not isinstance(host_ip, str):
            raise ApiError(f"port mapping {m!r} needs integer hostPort and containerPort and "
                           f"string protocol and hostIP", INVALID_ENV)
        out.append({"hostPort": host_port, "containerPort": container_port,
                    "protocol": proto.lower(), "hostIP": host_ip})
    return out


def _hostports_note(hostports: list[dict[str, Any]]) -> str:
    if not hostports:
        return ""
    return ", hostPorts " + ", ".join(
        f"{m['hostIP'] or '*'}:{m['hostPort']}/{m['protocol']}->{m['containerPort']}"
        for m in hostports)


class DataplaneHandler:
    """The local API's ops on a NodeDataplane; one request at a time (a lock,
    which callers that also change the node may share through `lock`). An
    op is answered only once the node's saved state holds its changes (a
    restarted agent adopts what the plugin was told); one save covers every
    op done before it began (a group commit, see __call__).

    attach   container_id, netns, ifname, host_ifname, ip (interface notation),
             mac, [mtu], [gateway], [k8s_namespace], [k8s_name],
             [port_mappings: [{hostPort, containerPort, protocol, hostIP}]]
             -> port; peers the existing host veth with a new bridge port
             and installs the pod's hostPorts (CNI portMappings). Idempotent;
             an attachment holding the same address is replaced (its DEL
             happened while the agent was away); a hostPort another live pod
             holds fails the attach (code PORT_CONFLICT) and attaches nothing.
    detach   container_id -> detached (false when unknown: not an error)
    check    container_id -> the attachment, or an error saying what is wrong
    status   -> node, ready, pods
    gc       valid: [container_id, ...] -> removed: [attachment, ...]; detaches
             every CNI attachment not listed (veths stay: the plugin deletes them)
    """

    OPS = ("attach", "detach", "check", "status", "gc")
    ORIGIN = "cni"

    def __init__(self, node: NodeDataplane, lock: threading.RLock | None = None) -> None:
        self.node = node
        self.lock = lock or threading.RLock()
        # The ops run one at a time anyway (the lock); running them on one
        # long-lived thread rather than on each connection's keeps one
        # netlink socket for them all (the runtime opens one per thread:
        # ~2 ms of every attach otherwise).
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="localapi-op")

    def close(self) -> None:
        """Let the op thread go (after the server stopped)."""
        self._worker.shutdown(wait=True)

    def __call__(self, request: Request) -> Response:
        op = request.get("op")
        if not isinstance(op, str) or not op:
            raise ApiError("request has no \"op\"; expected one of " + ", ".join(self.OPS),
                           INVALID_ENV)
        if op not in self.OPS:
            raise ApiError(f"unknown op {op!r}; this agent knows {', '.join(self.OPS)} "
                           f"(are pcn-cni and the agent the same version?)", INTERNAL)
        try:
            response = self._worker.submit(self._run, op, request, time.monotonic()).result()
        finally:
            # Group commit: the op's changes are answered only once a saved
            # state holds them (a restarted agent adopts what it was told),
            # and the save is a task behind the ops queued meanwhile on the
            # op thread, so one save covers them all (each save writes the
            # node's whole state: 30 pods added at once made 30 saves, each
            # one longer). Even a failed op's changes are saved.
            flushing = time.monotonic()
            saved = self._worker.submit(self._flush).result()
        # the agent's part of the plugin's time (PCN_CNI_TRACE, bench cni-add):
        # waiting for the node's lock, the op itself, then the wait for the
        # save that covers it and that save (none when another one did)
        response["timing"]["save_ms"] = round((time.monotonic() - flushing) * 1000, 3)
        response["timing"]["saved"] = saved
        return response

    def _run(self, op: str, request: Request, asked: float) -> Response:
        """One op on the op thread; `asked`: time.monotonic() of the request.
        Its changes are left unsaved (see _flush)."""
        with self.lock:
            began = time.monotonic()
            with self.node.batch(defer=True):
                response: Response = getattr(self, f"op_{op}")(request)
            ended = time.monotonic()
        response["timing"] = {"lock_wait_ms": round((began - asked) * 1000, 3),
                              "op_ms": round((ended - began) * 1000, 3)}
        return response

    def _flush(self) -> bool:
        """On the op thread: save what the ops before left unsaved; whether
        this call saved (False: nothing was left, an earlier flush or a
        reconcile pass's save covered it)."""
        with self.lock:
            return self.node.flush()

    # ---------------------------------------------------------------- helpers
    @property
    def ready(self) -> bool:
        n = self.node
        return n.bridge is not None and n.rt.ipr is not None and n.rt.pin_dir is not None

    def _require_ready(self) -> None:
        if not self.ready:
            raise ApiError(f"the data plane of node {self.node.cfg.name} is not up yet; retry "
                           f"shortly", TRY_AGAIN_LATER)

    def _host_ifindex(self, host_ifname: str) -> int | None:
        dev = self.node.rt.netdev(host_ifname)
        return dev.index if dev is not None else None

    @staticmethod
    def _describe(pod: Pod) -> Response:
        return {"container_id": pod.key, "netns": pod.netns, "ifname": pod.iface.ifname,
                "host_ifname": pod.iface.host_ifname, "ip": pod.iface.address,
                "mac": pod.iface.mac, "port": pod.port.name,
                "k8s_namespace": pod.k8s_namespace, "k8s_name": pod.k8s_name}

    # ---------------------------------------------------------------- ops
    def op_status(self, request: Request) -> Response:
        return {"node": self.node.cfg.name, "ready": self.ready,
                "pods": len(self.node.pods) if self.ready else 0}

    def op_attach(self, request: Request) -> Response:
        from pcn_agent.node import podnet

        self._require_ready()
        node = self.node
        cid = _str_field(request, "container_id")
        netns = _str_field(request, "netns")
        ifname = _str_field(request, "ifname")
        host_if = _str_field(request, "host_ifname")
        mac = _str_field(request, "mac")
        try:
            addr = ipaddress.IPv4Interface(_str_field(request, "ip"))
        except ValueError as exc:
            raise ApiError(f"request field 'ip' is not an IPv4 address with a prefix: {exc}",
                           INVALID_ENV) from None
        pod_net = ipaddress.IPv4Network(node.cfg.pod_cidr)
        if addr.ip not in pod_net or addr.network != pod_net:
            raise ApiError(f"address {addr} is not in node {node.cfg.name}'s pod CIDR "
                           f"{pod_net}: the IPAM range of the CNI configuration must lie in "
                           f"this node's pod CIDR, with its prefix length", INVALID_CONFIG)
        gateway = request.get("gateway") or node.cfg.gateway
        if gateway != node.cfg.gateway:
            raise ApiError(f"gateway {gateway} is not node {node.cfg.name}'s pod gateway "
                           f"{node.cfg.gateway}: set the IPAM range's gateway to "
                           f"{node.cfg.gateway}", INVALID_CONFIG)
        mtu = request.get("mtu") or node.cfg.mtu
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535:
            raise ApiError(f"request field 'mtu' must be an integer in 68..65535, not {mtu!r}",
                           INVALID_ENV)
        ifindex = self._host_ifindex(host_if)
        if ifindex is None:
            raise ApiError(f"no interface {host_if} in node {node.cfg.name}'s network namespace: "
                           f"create the veth pair before asking to attach it", INTERNAL)

        hostports = _port_mappings(request)
        old = node.pods.get(cid)
        if old is not None:
            if (old.iface.host_ifname == host_if and old.port.netdev == host_if
                    and old.port.peer == ifindex and old.iface.address == str(addr)):
                self._set_hostports(old, hostports)
                return {**self._describe(old), "attached": True, "already": True}
            log.warning("container %s re-attached (%s -> %s): replacing its old port", cid,
                        old.iface.host_ifname, host_if)
            node.detach_pod(cid)
        ip = str(addr.ip)  # the pods' addresses are in interface notation, as str(addr)
        for key, pod in list(node.pods.items()):
            if pod.origin == self.ORIGIN and pod.iface.address.partition("/")[0] == ip:
                log.warning("address %s moves from container %s to %s: detaching the old "
                            "attachment (its DEL came while the agent was away)", addr.ip, key,
                            cid)
                node.detach_pod(key)
        iface = podnet.PodInterface(host_if, ifname, str(addr), mac, str(gateway), mtu)
        pod = node.register_pod(cid, netns, iface,
                                k8s_namespace=_str_field(request, "k8s_namespace", False),
                                k8s_name=_str_field(request, "k8s_name", False),
                                origin=self.ORIGIN, ifindex=ifindex)
        try:
            self._set_hostports(pod, hostports)
        except BaseException:
            node.detach_pod(cid)
            raise
        log.info("attached container %s (%s/%s, %s) on %s%s", cid, pod.k8s_namespace,
                 pod.k8s_name, addr, host_if, _hostports_note(hostports))
        return {**self._describe(pod), "attached": True, "already": False}

    def _set_hostports(self, pod: Pod, hostports: list[dict[str, Any]]) -> None:
        from pcn_agent.dataplane.cubes.dispatcher import HostPort, HostPortConflict, HostPortError

        who = f"{pod.k8s_namespace}/{pod.k8s_name}" if pod.k8s_name else pod.key
        ip = str(ipaddress.IPv4Interface(pod.iface.address).ip)
        mappings = [HostPort(m["hostIP"], m["hostPort"], m["protocol"], ip, m["containerPort"],
                             pod.key, who) for m in hostports]
        try:
            self.node.set_hostports(pod.key, mappings)
        except HostPortConflict as exc:
            raise ApiError(str(exc), PORT_CONFLICT) from None
        except HostPortError as exc:
            raise ApiError(str(exc), INVALID_CONFIG) from None

    def op_detach(self, request: Request) -> Response:
        cid = _str_field(request, "container_id")
        if cid not in self.node.pods:
            return {"container_id": cid, "detached": False}
        self._require_ready()
        pod = self.node.detach_pod(cid)
        assert pod is not None
        log.info("detached container %s (%s)", cid, pod.iface.host_ifname)
        return {**self._describe(pod), "detached": True}

    def op_check(self, request: Request) -> Response:
        self._require_ready()
        cid = _str_field(request, "container_id")
        pod = self.node.pods.get(cid)
        if pod is None:
            raise ApiError(f"container {cid} is not attached to node {self.node.cfg.name}'s "
                           f"data plane", UNKNOWN_CONTAINER)
        ifindex = self._host_ifindex(pod.iface.host_ifname)
        if ifindex is None:
            raise ApiError(f"container {cid}'s host interface {pod.iface.host_ifname} is gone "
                           f"but the agent still has its port: delete and re-add the pod",
                           INTERNAL)
        if pod.port.netdev != pod.iface.host_ifname or pod.port.peer != ifindex:
            raise ApiError(f"container {cid}'s bridge port is not peered with "
                           f"{pod.iface.host_ifname} (ifindex {ifindex}): delete and re-add "
                           f"the pod", INTERNAL)
        return {**self._describe(pod), "attached": True}

    def op_gc(self, request: Request) -> Response:
        valid = request.get("valid")
        if not isinstance(valid, list) or not all(isinstance(v, str) for v in valid):
            raise ApiError("request field 'valid' must be a list of container ids", INVALID_ENV)
        keep = set(valid)
        stale = [k for k, p in self.node.pods.items()
                 if p.origin == self.ORIGIN and k not in keep]
        if stale:
            self._require_ready()
        removed = []
        for key in stale:
            pod = self.node.detach_pod(key)
            if pod is not None:
                removed.append(self._describe(pod))
                log.info("gc: detached stale container %s (%s)", key, pod.iface.host_ifname)
        return {"removed": removed}


# ------------------------------------------------------------------- pcn-cni's launcher
CNI_FRAME = b"PCNCNI1"  # the first word of the `cni` op's answer (cni/launcher.c reads it)


def default_cni_concurrency() -> int:
    """CNI invocations the agent runs at once: two per CPU (one in its
    Python work, one waiting for IPAM or the kernel), 2 to 16."""
    return max(2, min(16, 2 * (os.cpu_count() or 1)))


class CniService:
    """The `cni` streaming op: a whole CNI invocation of pcn-cni's C launcher
    (operator/pcn_agent/cni/launcher.c), run by the agent on the
    connection's thread with the reference plugin's code
    (pcn_agent.cni.commands.run_in_agent), so a pod ADD costs no interpreter
    start and no imports: the agent is running and warm.

    Request (one JSON line): {"op": "cni", "env": {NAME: value, ...} (the
    launcher's whole environment: CNI_*, PATH), "stdin": "<the network
    configuration, as text>"}.
    Answer: b"PCNCNI1 <status> <stdout bytes> <stderr bytes>\n", then the
    plugin's stdout and stderr as they are: the result or CNI error JSON and
    the exit status (0 or 1) the launcher passes on.

    The thread enters the node's network namespace (`netns`, a path; None:
    the agent's own, as in the DaemonSet's hostNetwork) for the run: the host
    veth end is made there, and CNI_NETNS is opened from there. Local API
    requests of the run (attach, detach, check, status, gc) go to `handler`
    in-process, the same handler the socket serves. ADDs run in parallel up
    to their attach, which the handler serialises (its node lock): IPAM and
    the netlink work of concurrent ADDs overlap, `concurrency` at a time (the
    others wait their turn before they start: their Python work shares one
    interpreter lock, and 30 threads contending for it made every ADD slower;
    30 ADDs at once in a one-node lab on 2 busy CPUs, back to back: all at
    once p50 487/355 ms, max 549/417; 4 at a time p50 204/221, max 317/359;
    2 at a time p50 333, max 565; 8 at a time p50 503/330, max 644/411).

    `settled`: called (on the last one's thread) when the invocations in
    flight have all ended after one of them asked for it (`defer`): the
    agent reconciles the node once after a burst of pods rather than after
    each (a full reconcile per attach made 30 ADDs at once wait for each
    other's reconciles on the node lock)."""

    def __init__(self, handler: Handler, netns: str | None = None,
                 settled: Callable[[], None] | None = None,
                 concurrency: int | None = None) -> None:
        self.handler = handler
        self.netns = netns
        self.settled = settled
        self.concurrency = concurrency or default_cni_concurrency()
        self._slots = threading.Semaphore(self.concurrency)
        self._lock = threading.Lock()
        self._inflight = 0
        self._deferred = False
        self._warned_unseen = False

    def _warn_unseen(self, path: str) -> None:
        with self._lock:
            first = not self._warned_unseen
            self._warned_unseen = True
        (log.warning if first else log.debug)(
            "CNI_NETNS %s is not visible in the agent's mounts (its /run/netns must be "
            "mounted from the host with HostToContainer propagation, the host's shared): "
            "pcn-cni falls back to its Python plugin, slower", path)

    def defer(self) -> bool:
        """If invocations are in flight, note that `settled` must run once
        they have all ended, and return True; else False (run it now)."""
        with self._lock:
            if self._inflight == 0 or self.settled is None:
                return False
            self._deferred = True
            return True

    def _begin(self) -> None:
        with self._lock:
            self._inflight += 1

    def _end(self) -> None:
        with self._lock:
            self._inflight -= 1
            fire = self._inflight == 0 and self._deferred
            if fire:
                self._deferred = False
        if fire and self.settled is not None:
            self.settled()

    def call(self, request: Request) -> Response:
        """A local API request in-process: the response as localapi.call
        returns it (ok included), or AgentError as it raises."""
        try:
            result = self.handler(request)
        except ApiError as exc:
            raise AgentError(str(exc), exc.code) from None
        except Exception as exc:
            log.exception("local API %s (for pcn-cni) failed", request.get("op"))
            raise AgentError(f"{request.get('op')} failed in the agent: {exc}", INTERNAL) \
                from None
        return {"ok": True, **result}

    def __call__(self, request: Request, conn: socket.socket) -> None:
        received = time.monotonic()
        env, stdin = request.get("env"), request.get("stdin")
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()) \
                or not isinstance(stdin, str):
            status, err = 1, b""
            out = json.dumps({"cniVersion": "1.0.0", "code": DECODE_FAILURE,
                              "msg": "the pcn agent got a cni request without \"env\" (an "
                                     "object of strings) and \"stdin\" (a string)",
                              "details": "are pcn-cni's launcher and the agent the same "
                                         "version?"}).encode() + b"\n"
        elif env.get("CNI_COMMAND") in ("ADD", "CHECK") and env.get("CNI_NETNS") and \
                not os.path.exists(env["CNI_NETNS"]):
            # The runtime's path is not in this container's mounts (a host whose
            # /run/netns does not propagate to the agent): a local API error line,
            # on which the launcher runs the Python plugin, from the caller's view.
            self._warn_unseen(env["CNI_NETNS"])
            conn.settimeout(READ_TIMEOUT_S)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(_error(
                    f"CNI_NETNS {env['CNI_NETNS']} is not visible to the agent: mount the "
                    f"host's /run/netns into its container with HostToContainer "
                    f"propagation from a shared mount; pcn-cni runs its Python plugin "
                    f"meanwhile", INVALID_ENV)).encode() + b"\n")
            return
        else:
            self._begin()
            try:
                with self._slots, rtnl.netns(self.netns):
                    status, out, err = cni_commands.run_in_agent(
                        env, stdin.encode(), self.call, received, time.monotonic())
            finally:
                self._end()
        conn.settimeout(READ_TIMEOUT_S)
        try:
            conn.sendall(b"%s %d %d %d\n" % (CNI_FRAME, status, len(out), len(err)) + out + err)
        except OSError as exc:
            log.warning("pcn-cni launcher went away before the answer (%s %s): %s",
                        env.get("CNI_COMMAND") if isinstance(env, dict) else "?",
                        env.get("CNI_CONTAINERID") if isinstance(env, dict) else "?", exc)
