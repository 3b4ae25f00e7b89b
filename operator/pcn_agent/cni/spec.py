"""CNI spec inputs and errors: the CNI_* environment, the network
configuration on stdin and the well-known error codes (CNI spec 1.1.0,
sections 2 "Execution Protocol", 5 "Result Types" and "Error codes").

Shapes: `read_env` gives an Env, `parse_conf` a NetConf; every refusal is a
CniError(code, msg, details) that pcn-cni prints as CNI error JSON.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re

TYPE_CHECKING = False  # typing itself costs the plugin's every run an import
if TYPE_CHECKING:
    from typing import Any

# CNI well-known error codes (spec 1.1.0 "Error codes").
INCOMPATIBLE_VERSION = 1
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
# Plugin-specific (the spec leaves 100 and up to plugins): a hostPort that
# another pod on the node holds.
PORT_CONFLICT = 100
INTERNAL = 999

DEFAULT_SOCKET = "/run/pcn/agent.sock"  # the agent's local API (NetConf "agentSocket")
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
DEFAULT_MTU = 1450
DEFAULT_AGENT_TIMEOUT_S = 10.0
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


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class Env:
    """The CNI_* variables of one run (plain classes here and below: importing
    dataclasses costs the plugin ~4 ms a run)."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path")

    def __init__(self, command: str, container_id: str = "", netns: str = "",
                 ifname: str = "") -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns  # absolute path of the pod's network namespace
        self.ifname = ifname
        self.args: dict[str, str] = {}  # CNI_ARGS' KEY=VALUE pairs
        self.path: list[str] = []  # CNI_PATH's directories

    @property
    def k8s_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def k8s_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


class NetConf:
    """The checked network configuration (`raw` is all of it, as given)."""

    __slots__ = ("raw", "cni_version", "name", "mtu", "agent_socket", "agent_timeout", "ipam",
                 "port_mappings")

    def __init__(self, raw: dict[str, Any], cni_version: str, name: str, mtu: int,
                 agent_socket: str, agent_timeout: float, ipam: dict[str, Any],
                 port_mappings: list[dict[str, Any]] | None = None) -> None:
        self.raw = raw
        self.cni_version = cni_version
        self.name = name
        self.mtu = mtu
        self.agent_socket = agent_socket
        self.agent_timeout = agent_timeout  # seconds
        self.ipam = ipam
        # runtimeConfig.portMappings, checked: [{"hostPort": int, "containerPort":
        # int, "protocol": "tcp" | "udp", "hostIP": str ("" for none)}]
        self.port_mappings = port_mappings or []

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
    sock = raw.get("agentSocket", DEFAULT_SOCKET)
    if not isinstance(sock, str) or not os.path.isabs(sock):
        raise CniError(INVALID_CONFIG, f"invalid agentSocket {sock!r}",
                       "\"agentSocket\" is the absolute path of the pcn agent's socket "
                       f"(default {DEFAULT_SOCKET})")
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
    return NetConf(raw, version, name, mtu, sock, float(timeout), ipam,
                   parse_port_mappings(raw.get("runtimeConfig")))


def _port(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        return None
    return value


_PORT_MAPPING_KEYS = {k.lower(): k for k in ("hostPort", "containerPort", "protocol", "hostIP")}


def parse_port_mappings(runtime_config: Any) -> list[dict[str, Any]]:
    """runtimeConfig.portMappings (the `portMappings` capability of the CNI
    conventions, which kubelet and containerd fill from every container's
    ports[].hostPort: [{"hostPort": 8080, "containerPort": 80, "protocol":
    "tcp", "hostIP": "127.0.0.1"}]), checked as the reference portmap plugin
    does: both ports 1-65535, protocol tcp or udp (any case; default tcp),
    hostIP an IPv4 address or empty. Mappings for IPv6 hostIPs are left out
    (pcn is IPv4 only; the runtime passes them for dual-stack pods). Raises
    CniError(INVALID_CONFIG) naming the bad entry."""
    if runtime_config is None:
        return []
    if not isinstance(runtime_config, dict):
        raise CniError(INVALID_CONFIG, "runtimeConfig must be a JSON object")
    mappings = runtime_config.get("portMappings")
    if mappings is None:
        return []
    if not isinstance(mappings, list):
        raise CniError(INVALID_CONFIG, "runtimeConfig.portMappings must be a list",
                       "each entry is {\"hostPort\", \"containerPort\", \"protocol\", "
                       "\"hostIP\"}")
    out: list[dict[str, Any]] = []
    for raw in mappings:
        if not isinstance(raw, dict):
            raise CniError(INVALID_CONFIG, f"runtimeConfig.portMappings entry {raw!r} is not "
                                           f"an object")
        # Keys in any case: containerd (go-cni's PortMapping has no JSON tags)
        # sends "HostPort", "ContainerPort", "Protocol", "HostIP"; the
        # conventions document writes "hostPort"; the reference portmap plugin
        # reads both (Go's encoding/json matches field names without case).
        m = {_PORT_MAPPING_KEYS.get(str(k).lower(), k): v for k, v in raw.items()}
        host_port, container_port = _port(m.get("hostPort")), _port(m.get("containerPort"))
        if host_port is None or container_port is None:
            raise CniError(INVALID_CONFIG, f"port mapping {json.dumps(m)}: hostPort and "
                                           f"containerPort must be integers from 1 to 65535")
        proto = m.get("protocol") or "tcp"
        if not isinstance(proto, str) or proto.lower() not in ("tcp", "udp"):
            raise CniError(INVALID_CONFIG, f"port mapping {json.dumps(m)}: protocol "
                                           f"{proto!r} is not supported",
                           "pcn translates TCP and UDP hostPorts (SCTP is not translated)")
        host_ip = m.get("hostIP") or ""
        if not isinstance(host_ip, str):
            raise CniError(INVALID_CONFIG, f"port mapping {json.dumps(m)}: hostIP must be a "
                                           f"string")
        if host_ip:
            try:
                ip = ipaddress.ip_address(host_ip)
            except ValueError:
                raise CniError(INVALID_CONFIG, f"port mapping {json.dumps(m)}: hostIP "
                                               f"{host_ip!r} is not an IP address") from None
            if ip.version == 6:
                continue
            host_ip = str(ip)
        out.append({"hostPort": host_port, "containerPort": container_port,
                    "protocol": proto.lower(), "hostIP": host_ip})
    return out
