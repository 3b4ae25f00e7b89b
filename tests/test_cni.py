"""pcn-cni run exactly as a container runtime runs it (CNI_* environment,
network configuration on stdin) inside the node namespace of a one-node lab,
whose data plane the agent's local API serves; Debian's host-local does IPAM.

Every test runs against both plugins (the `plugin` parameter): "launcher",
the C launcher the node installs as /opt/cni/bin/pcn, which hands the
invocation to the agent (CniService runs the plugin's code in-process) and
execs the Python plugin when the agent cannot take it; and "python", the
reference plugin run on its own."""

from __future__ import annotations

import ipaddress
import itertools
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pcn_agent.cni import localapi, spec
from pcn_agent.cni.ipam import run_program
from pcn_agent.cni.link import host_ifname
from pcn_agent.control.localapi import CniService, DataplaneHandler, LocalApiServer
from pcn_agent.dataplane import maps
from pcn_agent.dataplane.netns import netns_path
from pcn_agent.node.wiring import NodeDataplane
from pcn_lab import kubelet
from pcn_lab.topology import Lab

pytestmark = pytest.mark.netns

CNI_PATH = "/usr/lib/cni"
HOST_LOCAL = Path(CNI_PATH) / "host-local"
# The Python plugin as nodes ran it before the launcher (and as the launcher's
# fallback runs it): the package's entry point with -I -S; the `pcn-cni`
# console script, `python -m pcn_agent.cni` and the launcher (without an agent
# to hand the invocation to) run the same code and are checked to answer alike.
PYTHON = kubelet.cni_binary("python")
LAUNCHER = kubelet.cni_binary("launcher")
PLUGINS = {"launcher": LAUNCHER, "python": PYTHON}
_SCRIPT = Path(sys.executable).with_name("pcn-cni")
OTHER_STARTS = [[sys.executable, "-m", "pcn_agent.cni"], LAUNCHER] + \
    ([[str(_SCRIPT)]] if _SCRIPT.exists() else [])


@pytest.fixture(params=list(PLUGINS))
def plugin(request: pytest.FixtureRequest) -> list[str]:
    """Each plugin's command line, for the tests that need no lab."""
    return PLUGINS[request.param]


@dataclass
class Run:
    rc: int
    out: dict[str, Any] | None
    stdout: str
    stderr: str

    def ok(self) -> dict[str, Any] | None:
        assert self.rc == 0, f"pcn-cni failed ({self.rc}): {self.stdout} {self.stderr}"
        return self.out

    def error(self, code: int) -> dict[str, Any]:
        assert self.rc != 0, f"pcn-cni succeeded: {self.stdout}"
        assert self.out is not None, f"no CNI error JSON on stdout: {self.stdout!r}"
        assert self.out["code"] == code, self.out
        assert self.out["msg"] and "cniVersion" in self.out
        return self.out


@dataclass
class CniLab:
    lab: Lab
    node: NodeDataplane
    tmp: Path
    sock: Path
    network: str
    plugin: list[str]
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @property
    def node_ns(self) -> str:
        assert self.node.cfg.netns is not None
        return self.node.cfg.netns

    @property
    def data_dir(self) -> Path:
        return self.tmp / "ipam"

    def conf(self, **overrides: Any) -> dict[str, Any]:
        net = ipaddress.IPv4Network(self.node.cfg.pod_cidr)
        conf: dict[str, Any] = {
            "cniVersion": "1.0.0", "name": self.network, "type": "pcn", "mtu": 1450,
            "agentSocket": str(self.sock),
            "ipam": {"type": "host-local", "dataDir": str(self.data_dir),
                     "ranges": [[{"subnet": str(net), "rangeStart": str(net[100]),
                                  "rangeEnd": str(net[150]), "gateway": self.node.cfg.gateway}]],
                     "routes": [{"dst": "0.0.0.0/0"}]}}
        conf.update(overrides)
        return {k: v for k, v in conf.items() if v is not None}

    def run(self, command: str | None, conf: dict[str, Any] | bytes | None = None,
            container_id: str = "", netns: str = "", ifname: str = "eth0",
            args: str = "", plugin: list[str] | None = None, **env: str) -> Run:
        environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_PATH": CNI_PATH}
        for key, value in (("CNI_COMMAND", command), ("CNI_CONTAINERID", container_id),
                           ("CNI_NETNS", netns), ("CNI_IFNAME", ifname), ("CNI_ARGS", args)):
            if value:
                environ[key] = value
        environ.update(env)
        environ = {k: v for k, v in environ.items() if v}
        data = conf if isinstance(conf, bytes) else json.dumps(conf or self.conf()).encode()
        proc = subprocess.run(["ip", "netns", "exec", self.node_ns, *(plugin or self.plugin)],
                              input=data,
                              env=environ, capture_output=True, timeout=60, check=False)
        stdout = proc.stdout.decode()
        try:
            out = json.loads(stdout) if stdout.strip() else None
        except ValueError:
            out = None
        return Run(proc.returncode, out, stdout, proc.stderr.decode())

    def pod_ns(self) -> tuple[str, str]:
        """A fresh pod namespace (removed with the lab): its name and path."""
        name = f"{self.lab.prefix}-c{next(self._ids)}"
        pr_netns.create(name)
        self.lab.namespaces.append(name)
        return name, netns_path(name)

    def add(self, container_id: str | None = None, **kw: Any) -> tuple[str, str, str, dict]:
        """ADD a new pod: (container id, netns name, netns path, result)."""
        cid = container_id or secrets.token_hex(32)
        name, path = self.pod_ns()
        result = self.run("ADD", kw.pop("conf", None), cid, path,
                          args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;"
                               f"K8S_POD_NAME=web-{cid[:6]}", **kw).ok()
        assert result is not None
        return cid, name, path, result

    def delete(self, cid: str, path: str = "", conf: dict | None = None) -> Run:
        return self.run("DEL", conf, cid, path)

    def allocated(self) -> dict[str, str]:
        """host-local's reservations: address -> container id."""
        d = self.data_dir / self.network
        if not d.is_dir():
            return {}
        out = {}
        for f in d.iterdir():
            try:
                ipaddress.ip_address(f.name)
            except ValueError:
                continue
            out[f.name] = f.read_text().split()[0]
        return out

    def node_links(self) -> set[str]:
        with IPRoute(netns=self.node_ns) as ipr:
            return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}

    def pod_links(self, netns: str) -> set[str]:
        with IPRoute(netns=netns) as ipr:
            return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}

    def exec(self, netns: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(netns, argv, timeout=30)

    def cni_pods(self) -> set[str]:
        return {k for k, p in self.node.pods.items() if p.origin == "cni"}


def _root_links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


@pytest.fixture(scope="module", params=list(PLUGINS))
def cl(request: pytest.FixtureRequest,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[CniLab]:
    """A one-node lab whose local API serves the data plane's ops and, for the
    launcher, whole CNI invocations (CniService, in the node's namespace), as
    the agent does; runs the plugin `request.param`."""
    if not HOST_LOCAL.exists():
        pytest.skip("host-local IPAM plugin missing (apt-get install containernetworking-plugins)")
    root_before = _root_links()
    lab = Lab(nodes_count=1, pods_per_node=0)
    tmp = tmp_path_factory.mktemp("cni")
    server = None
    try:
        lab.build()
        node = lab.node(1)
        sock = tmp / "agent.sock"
        handler = DataplaneHandler(node)
        server = LocalApiServer(sock, handler, streams={
            "cni": CniService(handler, netns_path(node.cfg.netns or ""))}).start()
        yield CniLab(lab, node, tmp, sock, f"pcn-test-{lab.run_id}", PLUGINS[request.param])
    finally:
        if server is not None:
            server.stop()
        lab.close()
    assert lab.leftovers() == [], f"teardown left {lab.leftovers()}"
    assert _root_links() == root_before


@pytest.fixture
def clean(cl: CniLab) -> Iterator[CniLab]:
    """Each test starts and must end without attachments, addresses or veths."""
    assert cl.cni_pods() == set() and cl.allocated() == {}
    links = cl.node_links()
    yield cl
    assert cl.cni_pods() == set(), "test left attachments"
    assert cl.allocated() == {}, "test left addresses"
    assert cl.node_links() == links, "test left links in the node namespace"


def _ping(cl: CniLab, netns: str, dst: str) -> None:
    p = cl.exec(netns, ["ping", "-c", "2", "-i", "0.2", "-W", "2", dst])
    assert p.returncode == 0, f"ping {dst} from {netns}: {p.stdout} {p.stderr}"


def _sysctl(cl: CniLab, netns: str, conf: str) -> str:
    """net.ipv6.conf.<conf>.disable_ipv6 in `netns`."""
    p = cl.exec(netns, ["cat", f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"])
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def _pod_addresses(netns: str, ifname: str = "eth0") -> set[str]:
    with IPRoute(netns=netns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        return {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=idx, family=2)}


# ------------------------------------------------------------------ no kernel
def test_version(plugin: list[str]) -> None:
    for asked, expected in (("1.0.0", "1.0.0"), ("0.4.0", "0.4.0"), (None, "1.1.0")):
        data = json.dumps({"cniVersion": asked}).encode() if asked else b""
        proc = subprocess.run(plugin, input=data, env={"CNI_COMMAND": "VERSION"},
                              capture_output=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stdout
        out = json.loads(proc.stdout)
        assert out == {"cniVersion": expected, "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


def test_plugin_code_never_imports_pyroute2() -> None:
    """The CNI bundle ships no pyroute2 (manifests/cni/bundle.py): every module
    the plugin may load, up front or on a command's path, must do without."""
    code = ("import sys\n"
            "import pcn_agent.cni.commands, pcn_agent.cni.ipam, pcn_agent.cni.link, "
            "pcn_agent.cni.localapi, pcn_agent.cni.spec, pcn_agent.cni.rtnl\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2')\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_help_explains_it_is_run_by_the_runtime(plugin: list[str]) -> None:
    proc = subprocess.run([*plugin, "--help"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 0
    assert "CNI plugin" in proc.stdout and "container runtime" in proc.stdout
    for word in ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "CNI_COMMAND",
                 "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"):
        assert word in proc.stdout


@pytest.mark.parametrize("start", OTHER_STARTS, ids=lambda a: Path(a[-1]).name)
def test_every_way_to_start_the_plugin_answers_alike(start: list[str]) -> None:
    """The console script and `python -m` run the code the fast entry runs."""
    def answers(argv: list[str]) -> tuple[bytes, bytes]:
        version = subprocess.run(argv, input=b'{"cniVersion": "0.4.0"}',
                                 env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                                 timeout=30, check=True).stdout
        usage = subprocess.run([*argv, "--help"], capture_output=True, timeout=30,
                               check=True).stdout
        return version, usage
    assert answers(start) == answers(PYTHON)


def _script(tmp: Path, body: str) -> str:
    exe = tmp / f"prog-{secrets.token_hex(3)}"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    return str(exe)


def test_run_program_is_subprocess_run_for_plugins(tmp_path: Path) -> None:
    """ipam.run_program, the plugin's subprocess.run(capture_output=True)."""
    echo = _script(tmp_path, 'cat; echo "$CNI_COMMAND" >&2; exit 3')
    big = secrets.token_bytes(1 << 20)  # far more than a pipe holds, both ways
    assert run_program(echo, big, {"CNI_COMMAND": "ADD"}, 30) == (3, big, b"ADD\n")
    assert run_program(echo, b"", {}, 30) == (3, b"", b"\n")
    deaf = _script(tmp_path, "echo out; exit 0")  # never reads its stdin
    assert run_program(deaf, big, {}, 30) == (0, b"out\n", b"")
    killed = _script(tmp_path, "kill -TERM $$")
    assert run_program(killed, b"", {}, 30)[0] == -15
    slow = _script(tmp_path, "exec sleep 30")
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        run_program(slow, b"", {}, 0.3)
    assert time.monotonic() - t < 10
    with pytest.raises(FileNotFoundError):
        run_program(str(tmp_path / "missing"), b"", {}, 30)
    (tmp_path / "not-executable").write_text("x")
    with pytest.raises(PermissionError):
        run_program(str(tmp_path / "not-executable"), b"", {}, 30)


def test_cni_args_and_env_parsing() -> None:
    env = spec.read_env("ADD", {"CNI_CONTAINERID": "abc", "CNI_NETNS": "/var/run/netns/x",
                               "CNI_IFNAME": "eth0", "CNI_PATH": "/a:/b",
                               "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"})
    assert (env.k8s_namespace, env.k8s_name, env.path) == ("ns", "p", ["/a", "/b"])
    with pytest.raises(spec.CniError) as err:
        spec.read_env("ADD", {"CNI_CONTAINERID": "abc", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0",
                             "CNI_PATH": "/a", "CNI_ARGS": "novalue"})
    assert err.value.code == 4
    with pytest.raises(spec.CniError) as err:
        spec.read_env("ADD", {"CNI_CONTAINERID": "abc", "CNI_NETNS": "/x",
                             "CNI_IFNAME": "a-name-too-long-for-linux", "CNI_PATH": "/a"})
    assert err.value.code == 4 and "CNI_IFNAME" in err.value.msg
    # DEL does not need the namespace (it may be gone).
    assert spec.read_env("DEL", {"CNI_CONTAINERID": "abc", "CNI_IFNAME": "eth0",
                                "CNI_PATH": "/a"}).netns == ""
    assert spec.parse_conf(b'{"cniVersion": "1.1.0", "name": "n", "type": "pcn", "mtu": "1400",'
                          b'"ipam": {"type": "host-local"}}').mtu == 1400


# ------------------------------------------------------------------ ADD/CHECK/DEL
def test_add_check_ping_del(clean: CniLab) -> None:
    cl = clean
    a_id, a_ns, a_path, a = cl.add()
    b_id, b_ns, b_path, b = cl.add()
    gw = cl.node.cfg.gateway
    net = ipaddress.IPv4Network(cl.node.cfg.pod_cidr)

    # A spec-conformant result.
    assert a["cniVersion"] == "1.0.0"
    host, cont = a["interfaces"]
    assert host == {"name": host_ifname(a_id), "mac": host["mac"]} and host["mac"]
    assert cont["name"] == "eth0" and cont["sandbox"] == a_path and cont["mac"]
    [ip] = a["ips"]
    assert ip["gateway"] == gw and ip["interface"] == 1 and "version" not in ip
    addr = ipaddress.IPv4Interface(ip["address"])
    assert addr.network == net and net[100] <= addr.ip <= net[150]
    assert a["routes"] == [{"dst": "0.0.0.0/0", "gw": gw}]
    assert isinstance(a["dns"], dict)

    # The pod has what the result says, the agent has the attachment.
    assert _pod_addresses(a_ns) == {ip["address"]}
    with IPRoute(netns=a_ns) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0]
        assert link.get_attr("IFLA_ADDRESS") == cont["mac"]
        assert link.get_attr("IFLA_MTU") == 1450
        routes = ipr.get_default_routes(family=2)
        assert [r.get_attr("RTA_GATEWAY") for r in routes] == [gw]
    # IPv4 only: IPv6 off on both ends, the pod's default for later interfaces untouched.
    assert _sysctl(cl, a_ns, "eth0") == _sysctl(cl, cl.node_ns, host["name"]) == "1"
    fresh, _ = cl.pod_ns()
    assert _sysctl(cl, a_ns, "default") == _sysctl(cl, fresh, "default")
    pod = cl.node.pods[a_id]
    assert (pod.k8s_namespace, pod.k8s_name, pod.origin) == ("default", f"web-{a_id[:6]}", "cni")
    assert pod.port.netdev == host_ifname(a_id)
    assert cl.allocated() == {str(addr.ip): a_id, b["ips"][0]["address"].split("/")[0]: b_id}

    # Traffic: pod to pod across the bridge, pod to its gateway (the router).
    b_ip = b["ips"][0]["address"].split("/")[0]
    _ping(cl, a_ns, b_ip)
    _ping(cl, b_ns, str(addr.ip))
    _ping(cl, a_ns, gw)

    # CHECK with the ADD result, as the runtime sends it.
    cl.run("CHECK", cl.conf(prevResult=a), a_id, a_path).ok()
    cl.run("CHECK", cl.conf(prevResult=b), b_id, b_path).ok()

    # Attaching again is idempotent at the agent.
    again = localapi.call(cl.sock, {
        "op": "attach", "container_id": a_id, "netns": a_path, "ifname": "eth0",
        "host_ifname": host["name"], "ip": ip["address"], "mac": cont["mac"]}, timeout=10)
    assert again["already"] is True and cl.node.pods[a_id].port is pod.port

    # DEL releases the link, the port and the address; twice is fine.
    cl.delete(a_id, a_path).ok()
    assert host_ifname(a_id) not in cl.node_links()
    assert "eth0" not in cl.pod_links(a_ns)
    assert a_id not in cl.node.pods
    assert str(addr.ip) not in cl.allocated()
    cl.delete(a_id, a_path).ok()
    _ping(cl, b_ns, gw)  # the other pod is untouched
    cl.delete(b_id, b_path).ok()


@pytest.mark.parametrize("start", OTHER_STARTS, ids=lambda a: Path(a[-1]).name)
def test_every_way_to_start_the_plugin_adds_checks_and_deletes(clean: CniLab,
                                                               start: list[str]) -> None:
    cl = clean
    cid, ns, path, result = cl.add(plugin=start)
    _ping(cl, ns, cl.node.cfg.gateway)
    cl.run("CHECK", cl.conf(prevResult=result), cid, path, plugin=start).ok()
    cl.run("DEL", None, cid, path, plugin=start).ok()
    assert cid not in cl.node.pods and host_ifname(cid) not in cl.node_links()


def test_trace_times_each_phase_of_an_add(clean: CniLab) -> None:
    """PCN_CNI_TRACE (what bench cni-add reads): one line per run, the ADD's
    marks in order on time.monotonic()'s clock, the agent's lock wait, op and save."""
    cl = clean
    trace = cl.tmp / f"trace-{secrets.token_hex(4)}.jsonl"
    before = time.monotonic()
    cid, ns, path, _ = cl.add(PCN_CNI_TRACE=str(trace))
    after = time.monotonic()
    cl.run("DEL", None, cid, path, PCN_CNI_TRACE=str(trace)).ok()
    add, dele = (json.loads(line) for line in trace.read_text().splitlines())
    assert (add["command"], add["container_id"]) == ("ADD", cid)
    names = [m[0] for m in add["marks"]]
    assert names == ["entered", "imported", "parsed", "checked", "ipam", "link", "agent", "done"]
    times = [m[1] for m in add["marks"]]
    assert before < times[0] and times == sorted(times) and times[-1] < after
    assert add["agent"]["lock_wait_ms"] >= 0 and add["agent"]["op_ms"] > 0
    # alone, the ADD's own flush saved its pod
    assert add["agent"]["save_ms"] > 0 and add["agent"]["saved"] is True
    # the launcher's ADD ran in the agent, not in its Python fallback
    assert add["where"] == dele["where"] == ("agent" if cl.plugin == LAUNCHER else "plugin")
    assert dele["command"] == "DEL" and [m[0] for m in dele["marks"]][-1] == "done"


def _fake_ipam(cl: CniLab, versions: list[str]) -> tuple[str, Path]:
    """An IPAM plugin speaking only `versions`, refusing any other cniVersion
    with code 1 before doing anything, as the reference plugins' skel does;
    it logs "COMMAND cniVersion" per run. (CNI_PATH entry, log)."""
    d = cl.tmp / f"ipam-{secrets.token_hex(4)}"
    d.mkdir()
    log = d / "calls.log"
    exe = d / "old-ipam"
    exe.write_text(f"""#!{sys.executable}
import json, os, sys
conf = json.load(sys.stdin)
with open({str(log)!r}, "a") as f:
    f.write(os.environ["CNI_COMMAND"] + " " + conf["cniVersion"] + "\\n")
if os.environ["CNI_COMMAND"] == "VERSION":
    print(json.dumps({{"cniVersion": conf["cniVersion"], "supportedVersions": {versions!r}}}))
    sys.exit(0)
print(json.dumps({{"code": 1, "msg": "incompatible CNI versions"}}))
sys.exit(1)
""")
    exe.chmod(0o755)
    return f"{d}:{CNI_PATH}", log


def test_ipam_that_does_not_speak_the_version_is_asked_only_then(clean: CniLab) -> None:
    """The IPAM plugin gets the configuration as it is; VERSION is asked only
    after it refused the version, and the error then says what it speaks."""
    cl = clean
    path, log = _fake_ipam(cl, ["0.3.1", "0.4.0"])
    links = cl.node_links()
    _, pod_path = cl.pod_ns()
    conf = cl.conf()
    conf["ipam"] = {**conf["ipam"], "type": "old-ipam"}
    err = cl.run("ADD", conf, secrets.token_hex(8), pod_path, CNI_PATH=path).error(1)
    assert "does not support cniVersion 1.0.0" in err["msg"]
    assert "0.3.1, 0.4.0" in err["details"]
    assert log.read_text().split("\n")[:-1] == ["ADD 1.0.0", "VERSION 1.0.0"]
    _no_leaks(cl, links)


@pytest.mark.parametrize("version", ["0.4.0", "1.1.0"])
def test_result_format_follows_cni_version(clean: CniLab, version: str) -> None:
    cl = clean
    cid, ns, path, result = cl.add(conf=cl.conf(cniVersion=version))
    assert result["cniVersion"] == version
    if version == "0.4.0":
        assert result["ips"][0]["version"] == "4"
    else:  # 1.1.0, IPAM run as 1.0.0 (Debian's host-local stops there)
        assert result["interfaces"][1]["mtu"] == 1450
    cl.run("CHECK", cl.conf(cniVersion=version, prevResult=result), cid, path).ok()
    _ping(cl, ns, cl.node.cfg.gateway)
    cl.delete(cid, path, conf=cl.conf(cniVersion=version)).ok()


def test_check_reports_a_missing_address(clean: CniLab) -> None:
    cl = clean
    cid, ns, path, result = cl.add()
    try:
        assert cl.exec(ns, ["ip", "addr", "flush", "dev", "eth0"]).returncode == 0
        err = cl.run("CHECK", cl.conf(prevResult=result), cid, path).error(999)
        assert result["ips"][0]["address"] in err["msg"] and "lacks" in err["msg"]
    finally:
        cl.delete(cid, path).ok()
    err = cl.run("CHECK", cl.conf(prevResult=result), cid, path).error(999)
    assert "missing" in err["msg"]


def test_del_after_the_namespace_is_gone(clean: CniLab) -> None:
    cl = clean
    cid, ns, path, result = cl.add()
    pr_netns.remove(ns)
    cl.lab.namespaces.remove(ns)
    cl.delete(cid, path).ok()  # the runtime still passes the old path
    cl.delete(cid).ok()  # or none at all
    assert cid not in cl.node.pods
    assert host_ifname(cid) not in cl.node_links()


def test_del_without_the_agent_still_releases_and_gc_drops_the_port(clean: CniLab) -> None:
    cl = clean
    cid, ns, path, result = cl.add()
    gone = cl.conf(agentSocket=str(cl.tmp / "no-agent.sock"))
    run = cl.delete(cid, path, conf=gone)
    run.ok()
    assert "releasing the link and address without it" in run.stderr
    assert host_ifname(cid) not in cl.node_links()
    assert cl.allocated() == {}
    assert cid in cl.node.pods  # the agent never heard of the DEL
    cl.run("GC", cl.conf(**{"cni.dev/valid-attachments": []})).ok()
    assert cid not in cl.node.pods


def test_gc_removes_what_is_not_valid(clean: CniLab) -> None:
    cl = clean
    x, x_ns, x_path, xr = cl.add()
    y, y_ns, y_path, yr = cl.add()
    x_ip = xr["ips"][0]["address"].split("/")[0]
    valid = [{"containerID": y, "ifname": "eth0"}]
    cl.run("GC", cl.conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": valid})).ok()
    assert x not in cl.node.pods and y in cl.node.pods
    assert host_ifname(x) not in cl.node_links()
    assert x_ip not in cl.allocated() and y in cl.allocated().values()
    _ping(cl, y_ns, cl.node.cfg.gateway)
    cl.run("GC", cl.conf(**{"cni.dev/valid-attachments": valid})).ok()  # nothing more to do
    assert y in cl.node.pods
    err = cl.run("GC", cl.conf()).error(7)
    assert "cni.dev/valid-attachments" in err["msg"]
    cl.delete(x, x_path).ok()  # DEL after GC is still fine
    cl.delete(y, y_path).ok()


def test_status(cl: CniLab) -> None:
    cl.run("STATUS", cl.conf(cniVersion="1.1.0")).ok()
    sock = cl.tmp / "status.sock"
    conf = cl.conf(cniVersion="1.1.0", agentSocket=str(sock))
    with LocalApiServer(sock, DataplaneHandler(cl.node)):
        assert cl.run("STATUS", conf).ok() is None
    assert not sock.exists()
    err = cl.run("STATUS", conf).error(50)
    assert "not available" in err["msg"] and str(sock) in err["msg"]


# ------------------------------------------------------------------ failures
def _no_leaks(cl: CniLab, links_before: set[str], pod_ns: str | None = None) -> None:
    assert cl.allocated() == {}, "a failed ADD left an address"
    assert cl.node_links() == links_before, "a failed ADD left a link"
    assert cl.cni_pods() == set()
    if pod_ns is not None:
        assert cl.pod_links(pod_ns) == {"lo"}


BAD_INPUTS = [
    # (id, CNI_* changes, configuration changes or raw stdin, code, words in msg)
    ("no-command", {"CNI_COMMAND": ""}, None, 4, "CNI_COMMAND is not set"),
    ("unknown-command", {"CNI_COMMAND": "FROB"}, None, 4, "unknown CNI_COMMAND 'FROB'"),
    ("no-container-id", {"CNI_CONTAINERID": ""}, None, 4, "CNI_CONTAINERID not set"),
    ("no-netns", {"CNI_NETNS": ""}, None, 4, "CNI_NETNS not set"),
    ("netns-missing", {"CNI_NETNS": "/var/run/netns/pcn-no-such-ns"}, None, 4,
     "does not exist"),
    ("netns-not-a-netns", {"CNI_NETNS": "/etc/hostname"}, None, 4, "not a network namespace"),
    ("invalid-json", {}, b'{"cniVersion": "1.0.0", ', 6, "not valid JSON"),
    ("empty-stdin", {}, b"", 6, "no network configuration"),
    ("unsupported-version", {}, {"cniVersion": "0.3.1"}, 1, "incompatible CNI version 0.3.1"),
    ("missing-ipam", {}, {"ipam": None}, 7, "no \"ipam\" section"),
    ("unknown-ipam", {}, {"ipam": {"type": "pcn-no-such-ipam"}}, 7, "not found in CNI_PATH"),
    ("bad-mtu", {}, {"mtu": "jumbo"}, 7, "invalid mtu"),
    ("relative-socket", {}, {"agentSocket": "agent.sock"}, 7, "invalid agentSocket"),
]


@pytest.mark.parametrize("env,conf,code,words", [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_the_right_error(clean: CniLab, env: dict[str, str],
                                         conf: dict | bytes | None, code: int,
                                         words: str) -> None:
    cl = clean
    links = cl.node_links()
    ns, path = cl.pod_ns()
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": secrets.token_hex(32), "CNI_NETNS": path,
               "CNI_IFNAME": "eth0", **env}
    stdin = conf if isinstance(conf, bytes) else cl.conf(**(conf or {}))
    run = cl.run(None, stdin, **environ)
    err = run.error(code)
    assert words in err["msg"], err
    _no_leaks(cl, links, ns)


def test_add_with_the_agent_unreachable_leaks_nothing(clean: CniLab) -> None:
    cl = clean
    links = cl.node_links()
    ns, path = cl.pod_ns()
    sock = cl.tmp / "no-agent.sock"
    err = cl.run("ADD", cl.conf(agentSocket=str(sock)), secrets.token_hex(32), path).error(11)
    assert "agent" in err["msg"] and str(sock) in err["msg"]
    assert "agentSocket" in err["details"]
    _no_leaks(cl, links, ns)


def test_add_refused_by_the_agent_rolls_back(clean: CniLab) -> None:
    # A range outside the node's pod CIDR: IPAM allocates and the veth is made
    # before the agent refuses, so both must be undone.
    cl = clean
    links = cl.node_links()
    ns, path = cl.pod_ns()
    conf = cl.conf()
    conf["ipam"]["ranges"] = [[{"subnet": "10.244.99.0/24", "gateway": "10.244.99.1"}]]
    err = cl.run("ADD", conf, secrets.token_hex(32), path).error(7)
    assert "pod CIDR" in err["msg"]
    _no_leaks(cl, links, ns)


def test_add_with_an_existing_interface_name_rolls_back(clean: CniLab) -> None:
    cl = clean
    cid, ns, path, result = cl.add()
    try:
        links = cl.node_links()
        err = cl.run("ADD", cl.conf(), secrets.token_hex(32), path).error(999)
        assert err["msg"] == f"interface eth0 already exists in {path}"
        assert cl.node_links() == links
        assert set(cl.allocated().values()) == {cid}
    finally:
        cl.delete(cid, path).ok()


PARALLEL_ADDS = 30  # issue 13: 30 ADDs at once on one node


def _saved_pods(cl: CniLab) -> set[str]:
    """The pods in the node's saved state: what a restarted agent adopts."""
    return set(json.loads(cl.node.rt.state_path.read_text())["meta"]["pods"])


def test_an_answered_add_or_del_is_in_the_saved_state(clean: CniLab) -> None:
    """The agent answers an attach or a detach only once its state file
    holds it (saves are grouped, never skipped): an agent restarted right
    after an ADD succeeded adopts the pod, after a DEL forgets it."""
    cl = clean
    cid, _, path, _ = cl.add()
    assert cid in _saved_pods(cl)
    cl.delete(cid, path).ok()
    assert cid not in _saved_pods(cl)


def test_concurrent_adds_and_dels(clean: CniLab) -> None:
    """30 ADDs started together (as a runtime starting many pods at once does)
    each get their own address and a working link (a ping to the gateway from
    every pod, and across pods), each in the saved state when it is answered
    (one save may cover several); DELs together leave nothing."""
    cl = clean
    pods = [(secrets.token_hex(32), *cl.pod_ns()) for _ in range(PARALLEL_ADDS)]
    gate = threading.Barrier(len(pods))
    cl.run("STATUS").ok()  # the agent's op thread has its netlink sockets
    sockets = cl.node.rt.netlink_sockets()

    def add(p: tuple[str, str, str]) -> tuple[Run, bool]:
        gate.wait()
        run = cl.run("ADD", None, p[0], p[2], args="IgnoreUnknown=1")
        return run, p[0] in _saved_pods(cl)

    with ThreadPoolExecutor(len(pods)) as pool:
        answered = list(pool.map(add, pods))
    runs = [run for run, _ in answered]
    results = [r.ok() for r in runs]
    assert all(saved for _, saved in answered), "an ADD was answered before its pod was saved"
    assert all(cl.node.pods[p[0]].port.flags & maps.PORT_PEER_NS for p in pods), \
        "a pod's port does not deliver into its veth's peer"
    ips = {res["ips"][0]["address"] for res in results if res}
    assert len(ips) == len(pods)
    assert cl.cni_pods() == {p[0] for p in pods}
    assert {cl.node.pods[p[0]].iface.address for p in pods} == ips
    assert set(cl.allocated().values()) == {p[0] for p in pods}
    gw = cl.node.cfg.gateway
    for (cid, ns, _), res in zip(pods, results, strict=True):
        assert res is not None and res["interfaces"][0]["name"] == host_ifname(cid)
        assert _pod_addresses(ns) == {res["ips"][0]["address"]}
        ping = cl.exec(ns, ["ping", "-c", "1", "-W", "2", gw])
        assert ping.returncode == 0, f"pod {ns} cannot ping its gateway: {ping.stdout}"
    _ping(cl, pods[0][1], results[-1]["ips"][0]["address"].split("/")[0])
    with ThreadPoolExecutor(len(pods)) as pool:
        for r in pool.map(lambda p: cl.delete(p[0], p[2]), pods):
            r.ok()
    # the requests' threads have come and gone: no netlink socket per request
    assert cl.node.rt.netlink_sockets() <= sockets


def test_address_taken_over_from_a_stale_attachment(clean: CniLab) -> None:
    # The agent missed a DEL (it was down); host-local hands the address to a
    # new pod: the agent must drop the stale port and the router's ARP entry.
    cl = clean
    net = ipaddress.IPv4Network(cl.node.cfg.pod_cidr)
    conf = cl.conf()
    conf["ipam"]["ranges"] = [[{"subnet": str(net), "rangeStart": str(net[160]),
                                "rangeEnd": str(net[160]), "gateway": cl.node.cfg.gateway}]]
    a, a_ns, a_path, ar = cl.add(conf=conf)
    _ping(cl, a_ns, cl.node.cfg.gateway)
    assert cl.node.router is not None
    assert cl.node.router.neighbor(str(net[160])) == ar["interfaces"][1]["mac"]
    cl.delete(a, a_path, conf=cl.conf(agentSocket=str(cl.tmp / "no-agent.sock"))).ok()
    assert a in cl.node.pods
    b, b_ns, b_path, br = cl.add(conf=conf)
    assert br["ips"][0]["address"] == f"{net[160]}/{net.prefixlen}"
    assert a not in cl.node.pods and b in cl.node.pods
    assert cl.node.router.neighbor(str(net[160])) is None
    _ping(cl, b_ns, cl.node.cfg.gateway)
    cl.delete(b, b_path, conf=conf).ok()


def test_second_add_of_the_same_container_is_refused_without_harm(clean: CniLab) -> None:
    cl = clean
    cid, ns, path, result = cl.add()
    before = cl.allocated()
    err = cl.run("ADD", cl.conf(), cid, path).error(999)
    assert "already exists" in err["msg"] and "DEL" in err["details"]
    assert cl.allocated() == before and cid in cl.node.pods
    _ping(cl, ns, cl.node.cfg.gateway)
    cl.delete(cid, path).ok()


def _hostports(cl: CniLab) -> set[tuple[str, int, str, str]]:
    assert cl.node.dispatcher is not None
    return {(h.host_ip, h.port, h.proto, h.owner) for h in cl.node.dispatcher.hostports}


def _with_ports(cl: CniLab, *mappings: dict[str, Any]) -> dict[str, Any]:
    """The configuration as libcni gives it to a plugin that declares the
    portMappings capability, with the pod's hostPorts."""
    return cl.conf(capabilities={"portMappings": True},
                   runtimeConfig={"portMappings": list(mappings)})


def test_add_installs_host_ports_and_del_removes_them(clean: CniLab) -> None:
    cl = clean
    node_ip = cl.node.cfg.node_ip
    tcp_lo = {"hostPort": 54323, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"}
    tcp_node = {**tcp_lo, "hostIP": node_ip}
    udp_node = {**tcp_node, "protocol": "udp"}
    added: list[tuple[str, str]] = []
    try:
        for m in (tcp_lo, tcp_node, udp_node):
            cid, _, path, _ = cl.add(conf=_with_ports(cl, m))
            added.append((cid, path))
        (a, _), (b, _), (c, _) = added
        assert _hostports(cl) == {("127.0.0.1", 54323, "tcp", a), (node_ip, 54323, "tcp", b),
                                  (node_ip, 54323, "udp", c)}
        # The same hostPort and protocol with no hostIP overlaps both TCP
        # ones: refused with pcn's code, naming a pod that holds it; the
        # failed ADD leaves nothing.
        links, allocated, pods = cl.node_links(), cl.allocated(), cl.cni_pods()
        ns, path = cl.pod_ns()
        err = cl.run("ADD", _with_ports(cl, {**tcp_lo, "hostIP": ""}), secrets.token_hex(32),
                     path, args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=late"
                     ).error(spec.PORT_CONFLICT)
        assert "54323/tcp" in err["msg"] and "already taken by pod default/web-" in err["msg"]
        assert (cl.node_links(), cl.allocated(), cl.cni_pods()) == (links, allocated, pods)
        assert cl.pod_links(ns) == {"lo"}
        assert len(_hostports(cl)) == 3
    finally:
        for cid, path in added:
            cl.delete(cid, path, conf=_with_ports(cl)).ok()
            cl.delete(cid, path, conf=_with_ports(cl)).ok()  # idempotent
    assert _hostports(cl) == set()
    assert cl.node.dispatcher is not None
    assert cl.node.dispatcher.hostport_service_keys() == set()


def test_add_with_a_host_ip_the_node_does_not_have_is_refused(clean: CniLab) -> None:
    cl = clean
    links = cl.node_links()
    ns, path = cl.pod_ns()
    err = cl.run("ADD", _with_ports(cl, {"hostPort": 8000, "containerPort": 80,
                                         "protocol": "tcp", "hostIP": "192.0.2.77"}),
                 secrets.token_hex(32), path).error(spec.INVALID_CONFIG)
    assert "hostIP 192.0.2.77" in err["msg"] and cl.node.cfg.node_ip in err["msg"]
    _no_leaks(cl, links, ns)
