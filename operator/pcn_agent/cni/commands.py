"""pcn-cni: the CNI plugin of pcn (CNI spec 1.0.0, with 1.1.0's STATUS and GC).

The container runtime runs it once per operation, with the network
configuration on stdin and the operation in CNI_* variables. ADD delegates
address allocation to the IPAM plugin named in the configuration, creates the
pod's veth pair (address, default route, MTU) and asks the node agent, over
its local unix socket, to attach the host end to the data plane; no BPF is
compiled on this path. DEL undoes it and is idempotent.

The plugin's start-up is part of every pod's latency: it imports only the
standard library and pcn_agent.cni's modules (links, addresses and routes
through pcn_agent.cni.rtnl on a netlink socket; no pyroute2, no `ip` processes).
"""

from __future__ import annotations

import _thread
import errno
import ipaddress
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pcn_agent.cni import localapi, rtnl
from pcn_agent.cni.ipam import Ipam, ipam_routes, pick_address
from pcn_agent.cni.link import check_netns, create_pod_link, delete_host_link, host_ifname
from pcn_agent.cni.spec import (
    DEFAULT_AGENT_TIMEOUT_S,
    DEFAULT_MTU,
    DEFAULT_SOCKET,
    INTERNAL,
    INVALID_CONFIG,
    LATEST,
    NOT_AVAILABLE,
    SUPPORTED_VERSIONS,
    TRY_AGAIN_LATER,
    CniError,
    Env,
    NetConf,
    parse_conf,
    peek_version,
    read_command,
    read_env,
)

TYPE_CHECKING = False  # no typing import at run time: the plugin starts once per pod
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    # a local API request -> the agent's successful response (raises
    # localapi.LocalApiError as localapi.call does)
    AgentCall = Callable[[dict[str, Any]], dict[str, Any]]

HELP = f"""\
pcn-cni: the CNI plugin of pcn, a Kubernetes network provider built from eBPF cubes.

It is not meant to be run by hand: the container runtime (containerd, CRI-O)
runs it for every pod sandbox, with the network configuration as JSON on
stdin and the operation in environment variables, as the CNI specification
(https://www.cni.dev/docs/spec/) describes. Install it on CNI_PATH (usually
/opt/cni/bin) under the name of the configuration's "type" ("pcn").

Commands (CNI_COMMAND):
  ADD      allocate an address (delegated IPAM), create the pod's veth pair,
           ask the pcn agent to attach it; print the result
  DEL      detach, delete the veth pair, release the address (idempotent)
  CHECK    verify the pod's interface, address and attachment
  VERSION  print the supported spec versions: {", ".join(SUPPORTED_VERSIONS)}
  STATUS   exit 0 if the pcn agent on this node can serve ADD, else error 50
  GC       detach and release every attachment not in cni.dev/valid-attachments

Environment:
  CNI_COMMAND      one of the commands above
  CNI_CONTAINERID  the container (sandbox) id                      ADD DEL CHECK
  CNI_NETNS        path of the pod's network namespace             ADD CHECK
  CNI_IFNAME       interface name inside the pod, e.g. eth0        ADD DEL CHECK
  CNI_ARGS         K8S_POD_NAMESPACE=..;K8S_POD_NAME=..            optional
  CNI_PATH         directories holding the IPAM plugin (":"-separated)

Network configuration (stdin):
  {{"cniVersion": "1.0.0", "name": "pcn", "type": "pcn", "mtu": {DEFAULT_MTU},
   "agentSocket": "{DEFAULT_SOCKET}",
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "<node pod CIDR>"}}]],
            "routes": [{{"dst": "0.0.0.0/0"}}]}}}}
  mtu           pod interface MTU (default {DEFAULT_MTU})
  agentSocket   the pcn agent's local API socket (default {DEFAULT_SOCKET})
  agentTimeout  seconds to wait for the agent (default {DEFAULT_AGENT_TIMEOUT_S:g})
  capabilities  {{"portMappings": true}}: the runtime then passes the pod's hostPorts
                as runtimeConfig.portMappings and the agent serves them (a hostPort
                another pod of the node holds fails ADD with code 100)

Errors are printed on stdout as CNI error JSON and the exit code is non-zero.
"""


def _agent(conf: NetConf, request: dict[str, Any]) -> dict[str, Any]:
    try:
        response = _inv().call(conf, request)
        _inv().agent_timing.update(response.get("timing") or {})
        return response
    except localapi.AgentError as exc:
        raise CniError(exc.code, f"the pcn agent refused {request['op']}: {exc}") from None
    except localapi.LocalApiError as exc:
        raise CniError(TRY_AGAIN_LATER, f"the pcn agent is not reachable: {exc}",
                       "pcn-cni asks the pcn agent on this node to attach pods; check that the "
                       "agent runs on this node and that agentSocket in the CNI configuration "
                       f"({conf.agent_socket}) is the socket it serves") from None


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn a low-level failure into an error that says what pcn-cni was doing."""
    try:
        yield
    except CniError:
        raise
    except Exception as exc:
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        if isinstance(code, int) and code > 0:  # NetlinkError, OSError: words, not (17, '...')
            raise CniError(INTERNAL, f"{what} failed: {os.strerror(code)}",
                           f"{type(exc).__name__} errno {code}") from exc
        raise CniError(INTERNAL, f"{what} failed: {exc}", type(exc).__name__) from exc


# ------------------------------------------------------------------- trace
class Invocation:
    """What one run of the plugin keeps aside from its result: the trace
    marks, the agent's timing, the messages for stderr, and how it reaches
    the agent. The plugin process has one (`_PROCESS`); the agent runs
    invocations for pcn-cni's C launcher on its own threads
    (pcn_agent.control.localapi.CniService), each with its own, and calls
    its handler directly instead of its socket.

    marks: [(phase, time.monotonic() in s when it ended)]; PCN_CNI_TRACE=FILE
    appends them, with the agent's own account of its part, to FILE as one
    JSON line per run: {"command", "container_id", "marks": [[phase, t], ...],
    "agent": {"lock_wait_ms", "op_ms"}, "where": "plugin" | "agent"}.
    bench/controlplane.py reads them."""

    __slots__ = ("marks", "agent_timing", "stderr", "agent", "where")

    def __init__(self, agent: AgentCall | None = None, where: str = "plugin") -> None:
        self.marks: list[tuple[str, float]] = []
        self.agent_timing: dict[str, Any] = {}
        self.stderr: list[str] = []
        self.agent = agent  # None: the agent's socket (conf.agent_socket)
        self.where = where

    def call(self, conf: NetConf, request: dict[str, Any]) -> dict[str, Any]:
        """One local API request; raises what localapi.call raises."""
        if self.agent is not None:
            return self.agent(request)
        return localapi.call(conf.agent_socket, request, conf.agent_timeout)

    def trace_line(self, environ: dict[str, str]) -> str:
        return json.dumps({"command": environ.get("CNI_COMMAND", ""),
                           "container_id": environ.get("CNI_CONTAINERID", ""),
                           "marks": self.marks, "agent": self.agent_timing,
                           "where": self.where}) + "\n"


_PROCESS = Invocation()
# The invocation each of the agent's threads runs (_thread's C thread-local,
# threading.local without importing threading: the plugin process has one).
_local = _thread._local()


def _inv() -> Invocation:
    """The invocation this thread runs (the process's own in the plugin)."""
    return getattr(_local, "inv", None) or _PROCESS


def mark(phase: str) -> None:
    """Note that `phase` of this run ended now."""
    _inv().marks.append((phase, time.monotonic()))


def _write_trace(path: str, environ: dict[str, str], inv: Invocation) -> None:
    try:
        with open(path, "a") as f:
            f.write(inv.trace_line(environ))
    except OSError as exc:
        _stderr(f"cannot write PCN_CNI_TRACE {path}: {exc}")


def _stderr(msg: str) -> None:
    inv = _inv()
    if inv is _PROCESS:
        print(f"pcn-cni: {msg}", file=sys.stderr)
    else:
        inv.stderr.append(f"pcn-cni: {msg}\n")


# ------------------------------------------------------------------- commands
def cmd_version(data: bytes) -> dict[str, Any]:
    version = LATEST
    if data.strip():
        try:
            asked = json.loads(data).get("cniVersion")
        except (ValueError, AttributeError):
            asked = None
        if asked in SUPPORTED_VERSIONS:
            version = asked
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def cmd_add(conf: NetConf, env: Env, environ: dict[str, str]) -> dict[str, Any]:
    check_netns(env.netns)
    host_if = host_ifname(env.container_id)
    if rtnl.link_index(host_if) is not None:  # checked before IPAM: nothing to undo
        raise CniError(INTERNAL, f"host interface {host_if} of container "
                                 f"{env.container_id} already exists",
                       "the container already has an attachment: the runtime must run DEL "
                       "before another ADD")
    ipam = Ipam(conf, env, environ)
    mark("checked")
    result = ipam.run("ADD")
    assert result is not None
    mark("ipam")
    created = attach_sent = False
    try:
        address, gateway = pick_address(result, ipam.type)
        routes = ipam_routes(result, gateway)
        with _step(f"creating the veth pair {host_if} <-> {env.netns}:{env.ifname}"):
            try:
                iface = create_pod_link(env, host_if, address, gateway, conf.mtu)
            except rtnl.NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
                raise CniError(INTERNAL, f"interface {env.ifname} already exists in "
                                         f"{env.netns}",
                               "CNI_IFNAME must name an interface the pod does not have "
                               "yet") from None
        created = True
        if len(routes) > 1:
            with _step(f"adding IPAM routes in {env.netns}"), rtnl.netns(env.netns), \
                    rtnl.Rtnl() as pod:
                idx = rtnl.link_index(env.ifname)
                if idx is None:
                    raise CniError(INTERNAL, f"interface {env.ifname} vanished from {env.netns}")
                for r in routes[1:]:
                    dst = ipaddress.IPv4Network(r["dst"])
                    pod.replace_route(str(dst.network_address), dst.prefixlen, r["gw"], idx)
        host_mac = iface.host_mac
        mark("link")
        attach_sent = True
        _agent(conf, {"op": "attach", "container_id": env.container_id, "netns": env.netns,
                      "ifname": env.ifname, "host_ifname": host_if, "ip": iface.address,
                      "mac": iface.mac, "mtu": conf.mtu, "gateway": gateway,
                      "k8s_namespace": env.k8s_namespace, "k8s_name": env.k8s_name,
                      "port_mappings": conf.port_mappings})
        mark("agent")
    except BaseException as exc:
        problems = _rollback_add(conf, env, ipam, host_if, created, attach_sent)
        if problems:
            _stderr("cleaning up the failed ADD: " + "; ".join(problems))
            if isinstance(exc, CniError):
                exc.details = "; ".join(filter(None, [exc.details, "cleanup: "
                                                      + "; ".join(problems)]))
        if isinstance(exc, CniError):
            raise
        raise CniError(INTERNAL, f"ADD failed: {exc}", type(exc).__name__) from exc

    ips: dict[str, str | int] = {"address": address, "gateway": gateway, "interface": 1}
    if conf.cni_version == "0.4.0":
        ips["version"] = "4"
    container: dict[str, str | int] = {"name": env.ifname, "mac": iface.mac,
                                       "sandbox": env.netns}
    host: dict[str, str | int] = {"name": host_if, "mac": host_mac}
    if conf.cni_version == "1.1.0":
        container["mtu"] = host["mtu"] = conf.mtu
    dns = result.get("dns") or conf.raw.get("dns") or {}
    return {"cniVersion": conf.cni_version, "interfaces": [host, container], "ips": [ips],
            "routes": routes, "dns": dns}


def _rollback_add(conf: NetConf, env: Env, ipam: Ipam, host_if: str, created: bool,
                  attach_sent: bool) -> list[str]:
    """Undo a failed ADD: no port, no link and no address may stay behind."""
    problems = []
    if attach_sent:
        try:
            _inv().call(conf, {"op": "detach", "container_id": env.container_id})
        except localapi.AgentUnavailable:
            pass  # nothing was attached
        except localapi.LocalApiError as exc:
            problems.append(f"agent detach: {exc}")
    if created:
        try:
            delete_host_link(host_if)
        except Exception as exc:
            problems.append(f"deleting {host_if}: {exc}")
    try:
        ipam.run("DEL")
    except CniError as exc:
        problems.append(f"releasing the address: {exc.msg}")
    return problems


def cmd_del(conf: NetConf, env: Env, environ: dict[str, str]) -> None:
    host_if = host_ifname(env.container_id)
    try:
        _inv().call(conf, {"op": "detach", "container_id": env.container_id})
    except localapi.AgentUnavailable as exc:
        # The agent is not running: the pod's link and address are still
        # released (a node without its agent must be able to delete pods);
        # the agent drops the stale port when the address is attached again
        # or on the runtime's next GC.
        _stderr(f"DEL {env.container_id}: {exc}; releasing the link and address without it")
    except localapi.AgentTimeout as exc:
        raise CniError(TRY_AGAIN_LATER, f"the pcn agent did not answer the detach of "
                                        f"{env.container_id}: {exc}",
                       "the agent is alive but stuck; the runtime retries DEL") from None
    except localapi.AgentError as exc:
        raise CniError(exc.code, f"the pcn agent could not detach {env.container_id}: {exc}") \
            from None
    with _step(f"deleting the host interface {host_if}"):
        delete_host_link(host_if)
    Ipam(conf, env, environ).run("DEL")


def cmd_check(conf: NetConf, env: Env, environ: dict[str, str]) -> None:
    check_netns(env.netns)
    host_if = host_ifname(env.container_id)
    expected = _expected_address(conf, env)
    if rtnl.link_index(host_if) is None:
        raise CniError(INTERNAL, f"host interface {host_if} of container {env.container_id} "
                                 f"is missing", "delete and re-create the pod")
    with _step(f"inspecting {env.netns}"), rtnl.netns(env.netns), rtnl.Rtnl() as pod:
        idx = rtnl.link_index(env.ifname)
        if idx is None:
            raise CniError(INTERNAL, f"interface {env.ifname} is missing in {env.netns}",
                           "delete and re-create the pod")
        link = pod.link(idx)
        have = pod.addresses(idx)
        mtu = link.mtu
        up = link.up
    attached = _agent(conf, {"op": "check", "container_id": env.container_id})
    want = expected or attached.get("ip", "")
    if want not in have:
        raise CniError(INTERNAL, f"{env.ifname} in {env.netns} lacks its address {want} "
                                 f"(has {', '.join(sorted(have)) or 'none'})",
                       "delete and re-create the pod")
    if attached.get("ip") != want or attached.get("host_ifname") != host_if:
        raise CniError(INTERNAL, f"the pcn agent has container {env.container_id} as "
                                 f"{attached.get('ip')} on {attached.get('host_ifname')}, not "
                                 f"{want} on {host_if}", "delete and re-create the pod")
    if mtu != conf.mtu:
        raise CniError(INTERNAL, f"{env.ifname} has MTU {mtu}, the configuration says {conf.mtu}")
    if not up:
        raise CniError(INTERNAL, f"{env.ifname} in {env.netns} is down")
    Ipam(conf, env, environ).run("CHECK")


def _expected_address(conf: NetConf, env: Env) -> str:
    prev = conf.raw.get("prevResult")
    if not isinstance(prev, dict):
        return ""
    interfaces = prev.get("interfaces") or []
    for ip in prev.get("ips") or []:
        i = ip.get("interface")
        if isinstance(i, int) and 0 <= i < len(interfaces) and \
                interfaces[i].get("name") == env.ifname and interfaces[i].get("sandbox"):
            return str(ip.get("address", ""))
    return ""


def cmd_status(conf: NetConf, env: Env, environ: dict[str, str]) -> None:
    try:
        status = _inv().call(conf, {"op": "status"})
    except localapi.LocalApiError as exc:
        raise CniError(NOT_AVAILABLE, f"the pcn agent is not available: {exc}",
                       "pods cannot be added until the pcn agent runs on this node") from None
    if not status.get("ready"):
        raise CniError(NOT_AVAILABLE, f"the pcn agent on node {status.get('node')} is not ready",
                       "its data plane is still starting; pods can be added once it is up")
    if env.path:
        ipam = Ipam(conf, env, environ)
        try:
            ipam.locate()
        except CniError as exc:
            raise CniError(NOT_AVAILABLE, exc.msg, exc.details) from None
        if ipam.supports("1.1.0"):
            try:
                ipam.run("STATUS")
            except CniError as exc:
                raise CniError(exc.code if exc.code in (50, 51) else NOT_AVAILABLE, exc.msg,
                               exc.details) from None


def cmd_gc(conf: NetConf, env: Env, environ: dict[str, str]) -> None:
    valid = conf.raw.get("cni.dev/valid-attachments", conf.raw.get("cni.dev/attachments"))
    if not isinstance(valid, list) or not all(
            isinstance(a, dict) and isinstance(a.get("containerID"), str) for a in valid):
        raise CniError(INVALID_CONFIG, "GC needs \"cni.dev/valid-attachments\": a list of "
                                       "{\"containerID\", \"ifname\"} objects",
                       "the container runtime adds it to the configuration for GC")
    removed = _agent(conf, {"op": "gc", "valid": sorted({a["containerID"] for a in valid})}
                     ).get("removed", [])
    problems = []
    for att in removed:
        try:
            delete_host_link(att["host_ifname"])
        except Exception as exc:
            problems.append(f"deleting {att['host_ifname']}: {exc}")
    ipam = Ipam(conf, env, environ)
    if ipam.supports("1.1.0"):
        try:
            ipam.run("GC")
        except CniError as exc:
            problems.append(exc.msg)
    else:
        # IPAM plugins before spec 1.1.0 (Debian's host-local 1.1.1) have no
        # GC: release what the agent just detached, one DEL each.
        if removed:
            _stderr(f"GC: IPAM plugin {ipam.type} predates CNI 1.1.0 (no GC); releasing the "
                    f"{len(removed)} detached attachment(s) with DEL; addresses of containers "
                    f"the agent never attached stay reserved")
        for att in removed:
            try:
                ipam.run("DEL", {"CNI_CONTAINERID": att["container_id"],
                                 "CNI_IFNAME": att["ifname"], "CNI_NETNS": ""})
            except CniError as exc:
                problems.append(f"releasing {att['ip']} of {att['container_id']}: {exc.msg}")
    if problems:
        raise CniError(INTERNAL, f"GC left {len(problems)} problem(s)", "; ".join(problems))


# ------------------------------------------------------------------- main
def run(environ: dict[str, str], data: bytes) -> dict[str, Any] | None:
    """One plugin invocation: the result to print, or None. Raises CniError."""
    command = read_command(environ)
    if command == "VERSION":
        return cmd_version(data)
    env = read_env(command, environ)
    conf = parse_conf(data)
    mark("parsed")
    handler = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status,
               "GC": cmd_gc}[command]
    return handler(conf, env, environ)


def execute(environ: dict[str, str], data: bytes) -> tuple[int, bytes]:
    """One invocation's output, as the plugin prints it: (exit status 0 or 1,
    stdout: the result or CNI error JSON, one line; empty for a command
    without a result). Both the plugin process (main) and the agent serving
    the C launcher (run_in_agent) answer through this."""
    try:
        result = run(environ, data)
    except CniError as exc:
        return 1, _error_json(peek_version(data), exc.code, exc.msg, exc.details)
    except Exception as exc:  # a bug: still answer in the CNI's terms
        return 1, _error_json(peek_version(data), INTERNAL, f"pcn-cni failed: {exc}",
                              type(exc).__name__)
    return 0, (json.dumps(result) + "\n").encode() if result is not None else b""


def run_in_agent(environ: dict[str, str], data: bytes, agent: AgentCall,
                 received: float, started: float | None = None) -> tuple[int, bytes, bytes]:
    """The plugin's work done by the agent for pcn-cni's C launcher, on the
    calling thread (which must be in the node's network namespace): (exit
    status, stdout, stderr) for the launcher to hand on. `agent` answers
    local API requests in-process (raising localapi.LocalApiError as
    localapi.call does); `received`: time.monotonic() when the request
    arrived (the trace's "entered"), `started` when its turn came (its
    "imported": nothing is imported per run, but an invocation may wait for
    others; default: now). PCN_CNI_TRACE in `environ` is written as by the
    plugin, with "where": "agent"."""
    inv = Invocation(agent, "agent")
    inv.marks += [("entered", received),
                  ("imported", time.monotonic() if started is None else started)]
    _local.inv = inv
    try:
        status, out = execute(environ, data)
        trace = environ.get("PCN_CNI_TRACE")
        if trace and environ.get("CNI_COMMAND"):
            mark("done")
            _write_trace(trace, environ, inv)
        return status, out, "".join(inv.stderr).encode()
    finally:
        _local.inv = None


def main(argv: list[str] | None = None, entered: float | None = None) -> NoReturn:
    """The plugin's process: argv (none but --help), CNI_* from the environment,
    the configuration on stdin; the result or CNI error JSON on stdout, exit 0
    or 1. `entered`: time.monotonic() when the entry point began, before its
    imports (the trace's first mark)."""
    if entered is not None:
        _PROCESS.marks.append(("entered", entered))
    mark("imported")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(HELP)
        sys.exit(0)
    if argv:
        sys.stderr.write(f"pcn-cni takes no arguments (got {' '.join(argv)}); see pcn-cni --help\n")
        sys.exit(2)
    environ = dict(os.environ)
    data = b""
    if environ.get("CNI_COMMAND") and not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
    status, out = execute(environ, data)
    sys.stdout.buffer.write(out)
    _exit(status, environ)


def _error_json(version: str, code: int, msg: str, details: str) -> bytes:
    err: dict[str, Any] = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        err["details"] = details
    return (json.dumps(err) + "\n").encode()


def _exit(status: int, environ: dict[str, str]) -> NoReturn:
    """End the process: output flushed, then os._exit, skipping the
    interpreter's teardown (module and object finalisation: ~5 ms of every
    run, for a process that holds nothing that needs it)."""
    trace = environ.get("PCN_CNI_TRACE")
    if trace:
        mark("done")
        _write_trace(trace, environ, _PROCESS)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
