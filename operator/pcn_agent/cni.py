"""pcn-cni: the CNI plugin of pcn (CNI spec 1.0.0, with 1.1.0's STATUS and GC).

The container runtime runs it once per operation, with the network
configuration on stdin and the operation in CNI_* variables. ADD delegates
address allocation to the IPAM plugin named in the configuration, creates the
pod's veth pair (address, default route, MTU) and asks the node agent, over
its local unix socket, to attach the host end to the data plane; no BPF is
compiled on this path. DEL undoes it and is idempotent.

The plugin's start-up is part of every pod's latency: it imports only the
standard library and pcn_agent's small modules (links, addresses and routes
through pcn_agent.rtnl on a netlink socket; no pyroute2, no `ip` processes).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import localapi
from .localapi import (
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    NOT_AVAILABLE,
    TRY_AGAIN_LATER,
)

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
DEFAULT_MTU = 1450
DEFAULT_AGENT_TIMEOUT_S = 10.0
IPAM_TIMEOUT_S = 60.0
# Which CNI_* variables each command needs (spec 1.1.0, section 2).
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": (),
    "GC": ("CNI_PATH",),
    "VERSION": (),
}
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

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
   "agentSocket": "{localapi.DEFAULT_SOCKET}",
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "<node pod CIDR>"}}]],
            "routes": [{{"dst": "0.0.0.0/0"}}]}}}}
  mtu           pod interface MTU (default {DEFAULT_MTU})
  agentSocket   the pcn agent's local API socket (default {localapi.DEFAULT_SOCKET})
  agentTimeout  seconds to wait for the agent (default {DEFAULT_AGENT_TIMEOUT_S:g})

Errors are printed on stdout as CNI error JSON and the exit code is non-zero.
"""


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


# ------------------------------------------------------------------- inputs
@dataclass
class Env:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: list[str] = field(default_factory=list)

    @property
    def k8s_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def k8s_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


@dataclass
class NetConf:
    raw: dict[str, Any]
    cni_version: str
    name: str
    mtu: int
    agent_socket: str
    agent_timeout: float
    ipam: dict[str, Any]

    @property
    def ipam_type(self) -> str:
        return str(self.ipam["type"])


def read_command(environ: dict[str, str]) -> str:
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "CNI_COMMAND is not set",
                       "pcn-cni is a CNI plugin run by the container runtime, which sets "
                       "CNI_COMMAND to one of " + ", ".join(COMMANDS) + "; see pcn-cni --help")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND {command!r}",
                       "pcn-cni supports " + ", ".join(COMMANDS))
    return command


def read_env(command: str, environ: dict[str, str]) -> Env:
    missing = [v for v in REQUIRED_ENV[command] if not environ.get(v)]
    if missing:
        raise CniError(INVALID_ENV, f"{', '.join(missing)} not set for {command}",
                       f"CNI {command} needs " + ", ".join(("CNI_COMMAND",) + REQUIRED_ENV[command])
                       + "; the container runtime sets them (see pcn-cni --help)")
    env = Env(command, environ.get("CNI_CONTAINERID", ""), environ.get("CNI_NETNS", ""),
              environ.get("CNI_IFNAME", ""))
    if env.container_id and not _CONTAINER_ID.match(env.container_id):
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID {env.container_id!r} is not a valid "
                                    f"container id",
                       "it must start with a letter or digit, followed by letters, digits, "
                       "'_', '.' or '-'")
    if env.ifname and (len(env.ifname) > 15 or env.ifname in (".", "..")
                       or any(c in env.ifname for c in "/: \t\n")):
        raise CniError(INVALID_ENV, f"CNI_IFNAME {env.ifname!r} is not a valid interface name",
                       "Linux interface names have 1 to 15 characters, without '/', ':' or "
                       "white space")
    if env.netns and not os.path.isabs(env.netns):
        raise CniError(INVALID_ENV, f"CNI_NETNS {env.netns!r} is not an absolute path",
                       "CNI_NETNS is the path of the pod's network namespace, e.g. "
                       "/var/run/netns/<name>")
    for pair in filter(None, environ.get("CNI_ARGS", "").split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS has an invalid pair {pair!r}",
                           "CNI_ARGS is a ';'-separated list of KEY=VALUE pairs")
        env.args[key] = value
    env.path = [p for p in environ.get("CNI_PATH", "").split(":") if p]
    return env


def peek_version(data: bytes) -> str:
    """The configuration's cniVersion if it is one we speak, for error output."""
    try:
        version = json.loads(data).get("cniVersion")
    except (ValueError, AttributeError):
        return LATEST
    return version if version in SUPPORTED_VERSIONS else LATEST


def parse_conf(data: bytes) -> NetConf:
    if not data.strip():
        raise CniError(DECODE_FAILURE, "no network configuration on stdin",
                       "the container runtime passes the network configuration as JSON on "
                       "stdin")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise CniError(DECODE_FAILURE, "the network configuration on stdin is not valid JSON",
                       str(exc)) from None
    if not isinstance(raw, dict):
        raise CniError(DECODE_FAILURE, "the network configuration must be a JSON object")
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion",
                       "set \"cniVersion\" to one of " + ", ".join(SUPPORTED_VERSIONS))
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"incompatible CNI version {version}",
                       "pcn-cni supports " + ", ".join(SUPPORTED_VERSIONS))
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise CniError(INVALID_CONFIG, "the network configuration needs a \"name\"",
                       "a name starts with a letter or digit, followed by letters, digits, "
                       "'_', '.' or '-'")
    mtu = raw.get("mtu", DEFAULT_MTU)
    try:
        if isinstance(mtu, bool):
            raise ValueError
        mtu = int(mtu)
        if not 68 <= mtu <= 65535:
            raise ValueError
    except (TypeError, ValueError):
        raise CniError(INVALID_CONFIG, f"invalid mtu {raw.get('mtu')!r}",
                       "\"mtu\" is an integer from 68 to 65535 (pcn's default is "
                       f"{DEFAULT_MTU}, room for the VXLAN header on a 1500-byte network)") \
            from None
    sock = raw.get("agentSocket", localapi.DEFAULT_SOCKET)
    if not isinstance(sock, str) or not os.path.isabs(sock):
        raise CniError(INVALID_CONFIG, f"invalid agentSocket {sock!r}",
                       "\"agentSocket\" is the absolute path of the pcn agent's socket "
                       f"(default {localapi.DEFAULT_SOCKET})")
    timeout = raw.get("agentTimeout", DEFAULT_AGENT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise CniError(INVALID_CONFIG, f"invalid agentTimeout {timeout!r}",
                       "\"agentTimeout\" is a positive number of seconds")
    ipam = raw.get("ipam")
    if not isinstance(ipam, dict) or not ipam:
        raise CniError(INVALID_CONFIG, "the network configuration has no \"ipam\" section",
                       "pcn delegates addresses to an IPAM plugin, e.g. \"ipam\": {\"type\": "
                       "\"host-local\", \"ranges\": [[{\"subnet\": \"<this node's pod CIDR>\"}]]}")
    ipam_type = ipam.get("type")
    if not isinstance(ipam_type, str) or not ipam_type or "/" in ipam_type:
        raise CniError(INVALID_CONFIG, "ipam.type must name an IPAM plugin, e.g. \"host-local\"",
                       "the plugin is looked up by that name in CNI_PATH")
    return NetConf(raw, version, name, mtu, sock, float(timeout), ipam)


# ------------------------------------------------------------------- IPAM
class Ipam:
    """The delegated IPAM plugin, run exactly as a runtime runs a plugin: the
    same environment (but CNI_COMMAND) and the network configuration on stdin.
    A configuration of cniVersion 1.1.0 is handed down as 1.0.0 to plugins
    that stop at 1.0.0 (the result format is the same)."""

    def __init__(self, conf: NetConf, env: Env, environ: dict[str, str]) -> None:
        self.conf = conf
        self.env = env
        self.environ = environ
        self.type = conf.ipam_type
        self._exe: str | None = None
        self._versions: list[str] | None = None

    @property
    def exe(self) -> str:
        return self.locate()

    def locate(self) -> str:
        """The plugin's path on CNI_PATH; CniError if it is not there."""
        if self._exe is None:
            for d in self.env.path:
                candidate = os.path.join(d, self.type)
                if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                    self._exe = candidate
                    break
            else:
                raise CniError(INVALID_CONFIG, f"IPAM plugin {self.type!r} not found in CNI_PATH "
                                               f"{':'.join(self.env.path) or '(empty)'}",
                               "install it there (host-local comes with the CNI reference "
                               "plugins, Debian package containernetworking-plugins) or fix "
                               "ipam.type")
        return self._exe

    def versions(self) -> list[str]:
        if self._versions is None:
            self._versions = [self.conf.cni_version]
            try:
                out = self._exec("VERSION", json.dumps(
                    {"cniVersion": self.conf.cni_version}).encode(), {})
                got = json.loads(out).get("supportedVersions")
                if isinstance(got, list) and got:
                    self._versions = [str(v) for v in got]
            except (CniError, ValueError, AttributeError):
                pass  # the real call will say what is wrong
        return self._versions

    def supports(self, version: str) -> bool:
        return version in self.versions()

    def _stdin(self) -> bytes:
        want = self.conf.cni_version
        supported = self.versions()
        if want in supported:
            return json.dumps(self.conf.raw).encode()
        if want == "1.1.0" and "1.0.0" in supported:
            return json.dumps({**self.conf.raw, "cniVersion": "1.0.0"}).encode()
        raise CniError(INCOMPATIBLE_VERSION,
                       f"IPAM plugin {self.type} does not support cniVersion {want}",
                       f"it supports {', '.join(supported)}; set the configuration's cniVersion "
                       f"to one both pcn-cni ({', '.join(SUPPORTED_VERSIONS)}) and it support")

    def run(self, command: str, overrides: dict[str, str] | None = None) -> dict[str, Any] | None:
        out = self._exec(command, self._stdin(), overrides or {})
        if command != "ADD":
            return None
        try:
            result = json.loads(out)
        except ValueError:
            raise CniError(INTERNAL, f"IPAM plugin {self.type} printed a result that is not "
                                     f"JSON", out[:500].decode(errors="replace")) from None
        if not isinstance(result, dict):
            raise CniError(INTERNAL, f"IPAM plugin {self.type} printed a result that is not "
                                     f"an object")
        return result

    def _exec(self, command: str, stdin: bytes, overrides: dict[str, str]) -> bytes:
        environ = {**self.environ, **overrides, "CNI_COMMAND": command}
        try:
            proc = subprocess.run([self.exe], input=stdin, env=environ, capture_output=True,
                                  timeout=IPAM_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise CniError(TRY_AGAIN_LATER, f"IPAM plugin {self.type} did not finish {command} "
                                            f"within {IPAM_TIMEOUT_S:g} s") from None
        except OSError as exc:
            raise CniError(INTERNAL, f"cannot run IPAM plugin {self.exe}: {exc}") from None
        if proc.returncode != 0:
            try:
                err = json.loads(proc.stdout)
                code, msg = int(err["code"]), str(err["msg"])
                details = str(err.get("details") or "")
            except (ValueError, KeyError, TypeError):
                code, msg = INTERNAL, f"exit status {proc.returncode}"
                details = (proc.stdout + proc.stderr).decode(errors="replace").strip()[:2000]
            raise CniError(code, f"IPAM plugin {self.type} failed {command}: {msg}", details)
        return proc.stdout


# ------------------------------------------------------------------- helpers
def _host_ifname(container_id: str) -> str:
    from . import podnet

    return podnet.host_ifname(container_id)


def _agent(conf: NetConf, request: dict[str, Any]) -> dict[str, Any]:
    try:
        return localapi.call(conf.agent_socket, request, conf.agent_timeout)
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


def _check_netns(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CniError(INVALID_ENV, f"CNI_NETNS {path} does not exist",
                       "the pod's network namespace must exist before ADD/CHECK") from None
    own = os.stat("/proc/self/ns/net")
    if st.st_dev != own.st_dev:
        raise CniError(INVALID_ENV, f"CNI_NETNS {path} is not a network namespace",
                       "CNI_NETNS is the path of a network namespace, e.g. /var/run/netns/<name>")
    if st.st_ino == own.st_ino:
        raise CniError(INVALID_ENV, f"CNI_NETNS {path} is pcn-cni's own (the node's) network "
                                    f"namespace", "a pod needs a namespace of its own")


def _pick_address(ipam_result: dict[str, Any], ipam_type: str) -> tuple[str, str]:
    """The IPv4 address (interface notation) and gateway from an IPAM result."""
    ips = ipam_result.get("ips") or []
    v4 = []
    for entry in ips:
        try:
            iface = ipaddress.ip_interface(entry["address"])
        except (KeyError, TypeError, ValueError):
            raise CniError(INTERNAL, f"IPAM plugin {ipam_type} returned an invalid ips entry "
                                     f"{entry!r}") from None
        if iface.version != 4:
            raise CniError(INVALID_CONFIG, f"IPAM plugin {ipam_type} returned {iface}, but pcn "
                                           f"routes IPv4 only", "configure IPv4 ranges only")
        v4.append((iface, entry.get("gateway")))
    if len(v4) != 1:
        raise CniError(INVALID_CONFIG, f"IPAM plugin {ipam_type} returned {len(v4)} IPv4 "
                                       f"addresses; pcn needs exactly one per pod",
                       "configure one IPv4 range set in ipam.ranges")
    iface, gateway = v4[0]
    if not gateway:
        raise CniError(INVALID_CONFIG, f"IPAM plugin {ipam_type} returned no gateway for "
                                       f"{iface}", "set the range's \"gateway\" to the node's "
                                                   "pod gateway (the first address of its pod "
                                                   "CIDR)")
    return str(iface), str(gateway)


def _ipam_routes(ipam_result: dict[str, Any], gateway: str) -> list[dict[str, str]]:
    """The routes to install in the pod: the default route via the gateway
    always, plus any other IPv4 routes IPAM asks for."""
    routes = [{"dst": "0.0.0.0/0", "gw": gateway}]
    for r in ipam_result.get("routes") or []:
        try:
            dst = ipaddress.ip_network(r["dst"], strict=False)
        except (KeyError, TypeError, ValueError):
            raise CniError(INTERNAL, f"IPAM returned an invalid route {r!r}") from None
        if dst.version != 4:
            raise CniError(INVALID_CONFIG, f"IPAM asks for the IPv6 route {dst}; pcn routes "
                                           f"IPv4 only", "remove IPv6 routes from ipam.routes")
        if dst.prefixlen == 0:
            continue
        routes.append({"dst": str(dst), "gw": str(r.get("gw") or gateway)})
    return routes


def _no_ipv6(ifname: str) -> None:
    """pcn routes IPv4 only: keep the kernel from sending IPv6 neighbour and
    router discovery into the data plane (the calling thread's namespace)."""
    from . import rtnl

    try:
        rtnl.write_sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", "1")
    except FileNotFoundError:
        pass  # IPv6 disabled in this kernel


@dataclass(frozen=True)
class PodLink:
    address: str  # interface notation
    mac: str  # of the pod's interface
    host_mac: str


def create_pod_link(env: Env, host_if: str, address: str, gateway: str,
                    mtu: int) -> PodLink:
    """The pod's veth pair (podnet.create's contract, on pcn_agent.rtnl): the
    host end `host_if` here, the pod end born in the pod's namespace, renamed
    to CNI_IFNAME, MTU, no IPv6, the address, up, lo up, the default route
    via `gateway`; then the host end up. On any failure nothing is left."""
    from . import rtnl

    iface = ipaddress.IPv4Interface(address)
    gw = ipaddress.IPv4Address(gateway)
    if gw not in iface.network:
        raise ValueError(f"gateway {gw} is outside the pod network {iface.network}")
    tmp = f"{host_if}p"[:15]
    with rtnl.Rtnl() as node:
        pod_fd = os.open(env.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            node.create_veth(host_if, tmp, pod_fd, mtu)
        finally:
            os.close(pod_fd)
        try:
            host_idx = rtnl.link_index(host_if)
            if host_idx is None:
                raise rtnl.NetlinkError(errno.ENODEV, f"{host_if} vanished")
            _no_ipv6(host_if)
            with rtnl.netns(env.netns), rtnl.Rtnl() as pod:
                idx = rtnl.link_index(tmp)
                if idx is None:
                    raise rtnl.NetlinkError(errno.ENODEV, f"{tmp} is not in {env.netns}")
                pod.set_link(idx, ifname=env.ifname, mtu=mtu)
                _no_ipv6(env.ifname)
                pod.add_address(idx, str(iface.ip), iface.network.prefixlen)
                pod.set_link(idx, up=True)
                lo = rtnl.link_index("lo")
                if lo is not None:
                    pod.set_link(lo, up=True)
                pod.replace_route("0.0.0.0", 0, str(gw), idx)
                mac = pod.link(idx).mac
            node.set_link(host_idx, up=True)
            host_mac = node.link(host_idx).mac
        except BaseException:
            node.delete_link(host_if)
            raise
    return PodLink(str(iface), mac, host_mac)


def delete_host_link(host_if: str) -> bool:
    """Delete a pod's veth pair by its host end. True if it existed."""
    from . import rtnl

    with rtnl.Rtnl() as node:
        return node.delete_link(host_if)


def _stderr(msg: str) -> None:
    print(f"pcn-cni: {msg}", file=sys.stderr)


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
    from . import rtnl

    _check_netns(env.netns)
    host_if = _host_ifname(env.container_id)
    if rtnl.link_index(host_if) is not None:  # checked before IPAM: nothing to undo
        raise CniError(INTERNAL, f"host interface {host_if} of container "
                                 f"{env.container_id} already exists",
                       "the container already has an attachment: the runtime must run DEL "
                       "before another ADD")
    ipam = Ipam(conf, env, environ)
    result = ipam.run("ADD")
    assert result is not None
    created = attach_sent = False
    try:
        address, gateway = _pick_address(result, ipam.type)
        routes = _ipam_routes(result, gateway)
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
        attach_sent = True
        _agent(conf, {"op": "attach", "container_id": env.container_id, "netns": env.netns,
                      "ifname": env.ifname, "host_ifname": host_if, "ip": iface.address,
                      "mac": iface.mac, "mtu": conf.mtu, "gateway": gateway,
                      "k8s_namespace": env.k8s_namespace, "k8s_name": env.k8s_name})
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

    ips = {"address": address, "gateway": gateway, "interface": 1}
    if conf.cni_version == "0.4.0":
        ips["version"] = "4"
    container = {"name": env.ifname, "mac": iface.mac, "sandbox": env.netns}
    host = {"name": host_if, "mac": host_mac}
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
            localapi.call(conf.agent_socket, {"op": "detach", "container_id": env.container_id},
                          conf.agent_timeout)
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
    host_if = _host_ifname(env.container_id)
    try:
        localapi.call(conf.agent_socket, {"op": "detach", "container_id": env.container_id},
                      conf.agent_timeout)
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
    from . import rtnl

    _check_netns(env.netns)
    host_if = _host_ifname(env.container_id)
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
        status = localapi.call(conf.agent_socket, {"op": "status"}, conf.agent_timeout)
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
    handler = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status,
               "GC": cmd_gc}[command]
    return handler(conf, env, environ)


def main(argv: list[str] | None = None) -> NoReturn:
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
    try:
        result = run(environ, data)
    except CniError as exc:
        _fail(peek_version(data), exc.code, exc.msg, exc.details)
    except Exception as exc:  # a bug: still answer in the CNI's terms
        _fail(peek_version(data), INTERNAL, f"pcn-cni failed: {exc}", type(exc).__name__)
    if result is not None:
        sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.exit(0)


def _fail(version: str, code: int, msg: str, details: str) -> NoReturn:
    err: dict[str, Any] = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        err["details"] = details
    sys.stdout.write(json.dumps(err) + "\n")
    sys.stdout.flush()
    sys.exit(1)


if __name__ == "__main__":
    main()
