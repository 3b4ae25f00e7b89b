"""The real agent (kopf, through KopfRunner) against an emulated Kubernetes API
(kmock's KubernetesEmulator, a real HTTP API in this process), with a real
node data plane in namespaces and pods wired by the real pcn-cni."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from pcn_agent.control import agent as agent_mod
from pcn_agent.control.reconcile import cube_name
from pcn_lab import checks, kubelet
from pcn_lab.apiserver import EmulatedApiServer, apply, delete, get
from pcn_lab.topology import Lab

pytestmark = pytest.mark.netns

VIP = "10.96.0.20"


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # not there yet
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.api = EmulatedApiServer().start()
        self.lab = Lab(nodes_count=1, pods_per_node=0, dataplane=False).build()
        self.node = self.lab.node_name(1)
        self.socket = str(tmp / "agent.sock")
        self.cni = kubelet.network_config(self.lab.pod_cidr(1), self._gateway(), self.socket,
                                          str(tmp / "ipam"), mtu=1450)
        self.pods: dict[str, kubelet.PodSandbox] = {}

    def _gateway(self) -> str:
        import ipaddress

        return str(ipaddress.IPv4Network(self.lab.pod_cidr(1)).network_address + 1)

    def node_object(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node},
                "spec": {"podCIDR": self.lab.pod_cidr(1)},
                "status": {"addresses": [{"type": "InternalIP", "address": self.lab.node_ip(1)}]}}

    def env(self) -> dict[str, str]:
        settings = self.tmp / "config.json"
        settings.write_text(json.dumps({"podCIDR": "10.244.0.0/16", "mtu": "1450"}))
        return {"NODE_NAME": self.node, "PCN_NETNS": self.node, "PCN_KUBE_URL": self.api.url,
                "PCN_SOCKET": self.socket, "PCN_CONFIG": str(settings),
                "PCN_METRICS_PORT": "0", "PCN_STATE_DIR": str(self.tmp / "state")}

    def add_pod(self, name: str, labels: dict[str, str], ns: str = "web") -> kubelet.PodSandbox:
        sb = kubelet.PodSandbox(ns, name, secrets.token_hex(8), f"{self.lab.prefix}-{name}")
        self.lab.namespaces.append(sb.netns)  # removed by lab.close() whatever happens
        kubelet.start_pod(self.node, sb, self.cni)
        apply(self.api, kubelet.pod_object(sb, self.node, labels))
        self.pods[name] = sb
        return sb

    def probe(self, pod: str, args: list[str], timeout: float = 20) -> dict[str, Any]:
        r = self.lab.exec(self.pods[pod].netns, checks.probe_argv(*args), timeout=timeout)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"ok": False, "error": r.stderr[-200:]}

    def close(self) -> None:
        a = agent_mod.AGENT
        try:
            for sb in self.pods.values():
                try:
                    kubelet.stop_pod(self.node, sb, self.cni)
                except Exception:
                    pass
            if a is not None and a.node is not None:
                a.node.down()
        finally:
            agent_mod.AGENT = None
            self.lab.close()
            self.api.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("agent"))
    mp = pytest.MonkeyPatch()
    try:
        for k, v in c.env().items():
            mp.setenv(k, v)
        agent_mod.AGENT = None
        apply(c.api, c.node_object())
        with KopfRunner(["run", "--standalone", "--all-namespaces", "-m", "pcn_agent.control.agent"],
                        timeout=60) as runner:
            wait_for("the agent's data plane", lambda: agent_mod.AGENT and agent_mod.AGENT.node,
                     timeout=90)
            for name, labels in (("web-1", {"app": "web"}), ("web-2", {"app": "web"}),
                                 ("client", {"app": "client"})):
                c.add_pod(name, labels)
            with _servers(c):
                yield c
        assert runner.exception is None or isinstance(runner.exception, SystemExit), \
            runner.exception
    finally:
        mp.undo()
        c.close()
    assert c.lab.leftovers() == []


class _servers:
    """Probe servers in the web pods."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.procs: list[Any] = []

    def __enter__(self) -> None:
        import subprocess

        for name in ("web-1", "web-2"):
            p = self.c.lab.popen(self.c.pods[name].netns, checks.probe_argv(
                "serve", "--tcp", "8080", "--udp", "8081"), stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, env={"PCN_PROBE_NAME": name,
                                                           "PATH": "/usr/bin:/bin"})
            assert p.stdout is not None and "listening" in p.stdout.readline()
            self.procs.append(p)

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(timeout=5)


def _svc_and_slice(c: Cluster, endpoints: list[str]) -> list[dict[str, Any]]:
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "web", "uid": "svc-web"},
           "spec": {"clusterIP": VIP, "type": "ClusterIP",
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
    sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": "web-abc", "namespace": "web",
                       "labels": {"kubernetes.io/service-name": "web"}},
          "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
          "endpoints": [{"addresses": [c.pods[p].ip], "conditions": {"ready": True}}
                        for p in endpoints]}
    return [svc, sl]


def test_service_and_endpoints_make_the_service_reachable(cluster: Cluster) -> None:
    for obj in _svc_and_slice(cluster, ["web-1", "web-2"]):
        apply(cluster.api, obj)
    r = wait_for("the service answering", lambda: (
        x := cluster.probe("client", ["tcp", VIP, "80", "--count", "10", "--timeout", "2"])
    )["ok"] and x)
    assert set(r["hosts"]) <= {"web-1", "web-2"}


def test_the_capture_program_is_compiled_after_the_first_reconcile(cluster: Cluster) -> None:
    """So that the node's first `kubectl pcn capture` starts at once (it
    missed a flow's first seconds while it compiled: issue 12 trial),
    without delaying the Services of the first reconcile."""
    agent = agent_mod.AGENT
    assert agent.reconciles >= 1
    wait_for("the capture program", lambda: agent.node.rt.type_loaded("packetcapture"),
             timeout=120)


def test_scaling_endpoints_moves_traffic(cluster: Cluster) -> None:
    svc, sl = _svc_and_slice(cluster, ["web-2"])
    apply(cluster.api, svc)
    apply(cluster.api, sl)

    def only_web2() -> bool:
        r = cluster.probe("client", ["tcp", VIP, "80", "--count", "10", "--timeout", "2"])
        return r["ok"] and set(r["hosts"]) == {"web-2"}

    wait_for("traffic to move to web-2", only_web2)


def _firewall_objects() -> list[dict[str, Any]]:
    nf = {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
          "metadata": {"name": "no-8080", "namespace": "web", "generation": 1},
          "spec": {"type": "firewall", "config": {"rules": [
              {"action": "drop", "protocol": "tcp", "destinationPorts": "8080"}]}}}
    chain = {"apiVersion": "pcn.dev/v1alpha1", "kind": "CubeChain",
             "metadata": {"name": "protect-web", "namespace": "web", "generation": 1},
             "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                      "ingress": [{"function": "no-8080"}]}}
    return [nf, chain]


def _ready(c: Cluster, kind: str, name: str) -> dict[str, Any] | None:
    obj = get(c.api, kind, name, "web")
    conds = (obj.get("status") or {}).get("conditions") or []
    return obj if conds and conds[0]["status"] == "True" else None


def test_chain_puts_a_firewall_on_matching_pods_only(cluster: Cluster) -> None:
    nf, chain = _firewall_objects()
    apply(cluster.api, nf)
    apply(cluster.api, chain)
    obj = wait_for("the chain to be Ready on both web pods", lambda: (
        o := _ready(cluster, "CubeChain", "protect-web")) and o["status"]["realizedPods"] == 2
        and o)
    assert obj["status"]["realizedNodes"] == 1
    assert obj["status"]["observedGeneration"] == 1
    node = agent_mod.AGENT.node
    by_name = {p.k8s_name: p for p in node.pods.values()}
    assert by_name["web-1"].egress == ["nf.web.no-8080"]  # traffic to the pod
    assert by_name["client"].egress == [] and by_name["client"].ingress == []
    blocked = cluster.probe("client", ["tcp", cluster.pods["web-1"].ip, "8080", "--timeout", "2"])
    assert not blocked["ok"] and "timed out" in blocked.get("error", ""), blocked
    fw = agent_mod.AGENT.manager.functions["nf.web.no-8080"]
    assert fw.status()["hits"][0] >= 1
    wait_for("the function to be Ready", lambda: _ready(cluster, "NetworkFunction", "no-8080"))
    status = agent_mod.AGENT.node_status()["functions"]["nf.web.no-8080"]
    assert status["rules"] == ["drop tcp dport 8080"] and status["rulesTotal"] == 1
    assert status["hits"][0] >= 1 and "laterHits" not in status
    assert status["allowReplies"] is False and status["replyHits"] == 0


def test_status_lists_a_bounded_number_of_rules(cluster: Cluster,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A firewall of 10 000 rules would overflow the status ConfigMap (1 MiB):
    it lists STATUS_RULES of them, and the hits of the later rules that
    counted something, by index."""
    for obj in _firewall_objects():
        apply(cluster.api, obj)
    wait_for("the function to be Ready", lambda: _ready(cluster, "NetworkFunction", "no-8080"))
    from pcn_agent.dataplane.cubes import functions as functions_mod

    key = cube_name("web", "no-8080")
    fw = agent_mod.AGENT.manager.functions[key]
    assert isinstance(fw, functions_mod.FirewallFunction)
    monkeypatch.setattr(functions_mod, "STATUS_RULES", 0)
    status = agent_mod.AGENT.node_status()["functions"][key]
    assert status["rules"] == [] and status["hits"] == [] and status["rulesTotal"] == 1
    hits = fw.fw.rule_hits()[0]
    assert status["laterHits"] == ({"0": hits} if hits else {})


def _not_ready(c: Cluster, kind: str, name: str) -> tuple[str, str] | None:
    conds = (get(c.api, kind, name, "web").get("status") or {}).get("conditions")
    return (conds[0]["reason"], conds[0]["message"]) if conds and \
        conds[0]["status"] == "False" else None


def test_invalid_edits_keep_the_firewall_in_force(cluster: Cluster) -> None:
    """Fail closed: an invalid rule added to the in-use firewall, or a
    misspelled function added to its chain, leaves the last valid version
    in force (the port stays blocked) and says so in the status; the last
    valid versions are kept on disk for an agent restart."""
    nf, chain = _firewall_objects()
    bad = {**nf, "spec": {"type": "firewall", "config": {"rules": [
        *nf["spec"]["config"]["rules"],
        {"action": "drop", "protocol": "icmp", "destinationPorts": "22"}]}}}
    apply(cluster.api, bad)
    why = wait_for("the function's failure", lambda: _not_ready(cluster, "NetworkFunction",
                                                                "no-8080"))
    assert why[0] == "Invalid" and "stays in force" in why[1], why
    typo = {**chain, "spec": {**chain["spec"], "ingress": [{"function": "no-8080"},
                                                          {"function": "no-80800"}]}}
    apply(cluster.api, typo)
    why = wait_for("the chain's failure", lambda: _not_ready(cluster, "CubeChain", "protect-web"))
    assert why[0] == "FunctionNotFound" and "stays in force" in why[1], why
    node = agent_mod.AGENT.node
    assert {p.k8s_name: p for p in node.pods.values()}["web-1"].egress == ["nf.web.no-8080"]
    blocked = cluster.probe("client", ["tcp", cluster.pods["web-1"].ip, "8080", "--timeout", "2"])
    assert not blocked["ok"] and "timed out" in blocked.get("error", ""), blocked
    saved = json.loads(agent_mod.AGENT.last_good_path.read_text())
    assert {(r["kind"], r["name"]) for r in saved} >= {("NetworkFunction", "no-8080"),
                                                       ("CubeChain", "protect-web")}
    apply(cluster.api, nf)
    apply(cluster.api, chain)
    wait_for("the chain to be Ready again", lambda: _ready(cluster, "CubeChain", "protect-web"))
    wait_for("the function to be Ready again", lambda: _ready(cluster, "NetworkFunction",
                                                              "no-8080"))


def test_deleting_the_chain_removes_the_cube(cluster: Cluster) -> None:
    nf, chain = _firewall_objects()
    delete(cluster.api, chain)
    delete(cluster.api, nf)
    wait_for("the cube to go", lambda: "nf.web.no-8080" not in agent_mod.AGENT.node.rt.cubes)
    r = cluster.probe("client", ["tcp", cluster.pods["web-1"].ip, "8080", "--timeout", "3"])
    assert r["ok"], r


def test_bad_objects_get_a_status_that_says_why(cluster: Cluster) -> None:
    apply(cluster.api, {"apiVersion": "pcn.dev/v1alpha1", "kind": "CubeChain",
                        "metadata": {"name": "dangling", "namespace": "web"},
                        "spec": {"ingress": [{"function": "does-not-exist"}]}})
    apply(cluster.api, {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
                        "metadata": {"name": "bad-rule", "namespace": "web"},
                        "spec": {"type": "firewall", "config": {"rules": [
                            {"action": "drop", "protocol": "icmp", "destinationPorts": "22"}]}}})

    def reason(kind: str, name: str) -> tuple[str, str] | None:
        conds = (get(cluster.api, kind, name, "web").get("status") or {}).get("conditions")
        return (conds[0]["reason"], conds[0]["message"]) if conds and \
            conds[0]["status"] == "False" else None

    r1 = wait_for("the chain's failure", lambda: reason("CubeChain", "dangling"))
    assert r1[0] == "FunctionNotFound" and "does-not-exist" in r1[1]
    r2 = wait_for("the function's failure", lambda: reason("NetworkFunction", "bad-rule"))
    assert r2[0] == "Invalid" and "needs protocol" in r2[1]
    events = cluster.api.request("GET", "/api/v1/namespaces/web/events")
    assert any(e.get("reason") == "FunctionNotFound" for e in events.get("items", [])), events


def test_a_policer_and_a_bandwidth_annotation(cluster: Cluster) -> None:
    """A second function type through the same path (NetworkFunction ->
    reconciler -> manager registry -> cube), and a pod's
    kubernetes.io/ingress-bandwidth annotation with no NetworkFunction: both
    run as policer cubes and report their counters in the node status."""
    nf = {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
          "metadata": {"name": "limit", "namespace": "web", "generation": 1},
          "spec": {"type": "policer", "config": {"rate": "100M", "scope": "shared"}}}
    chain = {"apiVersion": "pcn.dev/v1alpha1", "kind": "CubeChain",
             "metadata": {"name": "limit-client", "namespace": "web", "generation": 1},
             "spec": {"podSelector": {"matchLabels": {"app": "client"}},
                      "egress": [{"function": "limit"}]}}
    apply(cluster.api, nf)
    apply(cluster.api, chain)
    wait_for("the policer chain to be Ready", lambda: (
        o := _ready(cluster, "CubeChain", "limit-client")) and o["status"]["realizedPods"] == 1)
    agent = agent_mod.AGENT
    assert agent.node.rt.cubes["nf.web.limit"].type == "policer"
    r = cluster.probe("client", ["tcp", cluster.pods["web-1"].ip, "8080", "--timeout", "3"])
    assert r["ok"], r
    status = agent.node_status()["functions"]["nf.web.limit"]
    assert status["type"] == "policer" and status["rate"] == 100_000_000
    assert status["scope"] == "shared" and status["passedPackets"] >= 1
    assert status["droppedPackets"] == 0

    pod = get(cluster.api, "Pod", "web-2", "web")
    pod["metadata"].setdefault("annotations", {})["kubernetes.io/ingress-bandwidth"] = "10M"
    apply(cluster.api, pod)
    cube = "bw.ingress.web.web-2"
    wait_for("the annotation's policer", lambda: cube in agent.node.rt.cubes)
    by_name = {p.k8s_name: p for p in agent.node.pods.values()}
    assert by_name["web-2"].egress[-1] == cube  # traffic to the pod, nearest to it
    r = cluster.probe("client", ["tcp", cluster.pods["web-2"].ip, "8080", "--timeout", "3"])
    assert r["ok"], r
    bw = agent.node_status()["pods"]["web/web-2"]["bandwidth"]["ingress"]
    assert bw["type"] == "policer" and bw["rate"] == 10_000_000 and bw["passedPackets"] >= 1
    assert cube not in agent.node_status()["functions"]

    pod["metadata"]["annotations"]["kubernetes.io/ingress-bandwidth"] = "10 M"
    apply(cluster.api, pod)
    wait_for("the invalid annotation to be reported",
             lambda: "web/web-2" in agent.bandwidth_errors)
    assert cube not in agent.node.rt.cubes  # runs unlimited, as the error says
    del pod["metadata"]["annotations"]["kubernetes.io/ingress-bandwidth"]
    apply(cluster.api, pod)
    delete(cluster.api, chain)
    delete(cluster.api, nf)
    wait_for("the policer to go", lambda: "nf.web.limit" not in agent.node.rt.cubes
             and not agent.bandwidth_errors)


# ----------------------------------------------------------------------------- CubeTypes
def _dscp_cubetype() -> dict[str, Any]:
    import yaml

    path = Path(__file__).resolve().parents[1] / "examples" / "cubetypes" / "dscp-marker.yaml"
    ct = next(d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "CubeType")
    ct["metadata"]["generation"] = 1
    return ct


def _cubetype_status(c: Cluster, name: str) -> dict[str, Any]:
    return c.api.request("GET", f"/apis/pcn.dev/v1alpha1/cubetypes/{name}").get("status") or {}


def test_a_cubetype_with_a_built_in_name_says_to_rename_it(cluster: Cluster) -> None:
    """The API server refuses such a name (the CRD's CEL rule); one that got
    past it (the lab's emulated server, an older CRD) is reported with reason
    ReservedName and a new name to take, not as an invalid schema."""
    ct = _dscp_cubetype()
    ct["metadata"] = {**ct["metadata"], "name": "flowmonitor"}
    apply(cluster.api, ct)
    try:
        st = wait_for("the CubeType's status", lambda: (
            s := _cubetype_status(cluster, "flowmonitor")).get("conditions") and s, timeout=60)
        cond = st["conditions"][0]
        assert (cond["status"], cond["reason"]) == ("False", "ReservedName"), cond
        assert cond["message"] == (
            "flowmonitor is the name of a built-in cube type; rename the CubeType (e.g. "
            "my-flowmonitor) and the spec.type of the NetworkFunctions that use it"), cond
        assert st["nodes"][cluster.node]["errors"][0]["stage"] == "name"
    finally:
        delete(cluster.api, ct)


def test_a_cubetype_compiles_and_its_functions_run_on_pods(cluster: Cluster) -> None:
    """A CubeType whose source does not compile says where in its status (the
    source's line) and makes no cube; fixed, it becomes Ready; a
    NetworkFunction of it with a config its schema refuses says which field;
    a valid one runs on a pod's chain, its counters in the node status; the
    type deleted while in use keeps the cube until the function goes."""
    agent = agent_mod.AGENT
    ct = _dscp_cubetype()
    good_source = ct["spec"]["source"]
    broken = good_source.replace("u8 tos =", "u8 tos = no_such_thing +")
    line = next(i for i, x in enumerate(broken.splitlines(), 1) if "no_such_thing" in x)
    apply(cluster.api, {**ct, "spec": {**ct["spec"], "source": broken}})
    nf = {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
          "metadata": {"name": "mark", "namespace": "web", "generation": 1},
          "spec": {"type": "dscp-marker", "config": {"dscp": 46}}}
    chain = {"apiVersion": "pcn.dev/v1alpha1", "kind": "CubeChain",
             "metadata": {"name": "mark-client", "namespace": "web", "generation": 1},
             "spec": {"podSelector": {"matchLabels": {"app": "client"}},
                      "egress": [{"function": "mark"}]}}
    apply(cluster.api, nf)
    apply(cluster.api, chain)

    def failed() -> dict[str, Any] | None:
        st = _cubetype_status(cluster, "dscp-marker")
        conds = st.get("conditions") or []
        return st if conds and conds[0]["status"] == "False" else None

    st = wait_for("the compile error in the CubeType's status", failed, timeout=60)
    mine = st["nodes"][cluster.node]
    assert st["conditions"][0]["reason"] == "CompileFailed" and not mine["compiled"]
    assert mine["errors"][0]["line"] == line, mine
    assert "no_such_thing" in mine["errors"][0]["message"]
    assert st["observedGeneration"] == 1
    why = wait_for("the function's failure", lambda: _not_ready(cluster, "NetworkFunction",
                                                                "mark"))
    assert why[0] == "CubeTypeNotReady" and "no_such_thing" in why[1], why
    assert cube_name("web", "mark") not in agent.node.rt.cubes

    fixed = {**ct, "metadata": {**ct["metadata"], "generation": 2}}
    apply(cluster.api, fixed)

    def ready() -> dict[str, Any] | None:
        st = _cubetype_status(cluster, "dscp-marker")
        conds = st.get("conditions") or []
        return st if conds and conds[0]["status"] == "True" and \
            st.get("observedGeneration") == 2 else None

    st = wait_for("the CubeType to be Ready", ready, timeout=60)
    assert st["nodes"][cluster.node]["compiled"] and st["nodes"][cluster.node]["errors"] == []

    apply(cluster.api, {**nf, "spec": {"type": "dscp-marker",
                                       "config": {"dscp": 99, "protocl": "udp"}}})
    why = wait_for("the invalid config's failure", lambda: (
        w := _not_ready(cluster, "NetworkFunction", "mark")) and w[0] == "Invalid" and w)
    assert "spec.config.dscp: 99 is greater than the maximum of 63" in why[1], why
    assert "spec.config.protocl: not a parameter of this type" in why[1], why

    apply(cluster.api, nf)
    wait_for("the chain to be Ready", lambda: (
        o := _ready(cluster, "CubeChain", "mark-client")) and o["status"]["realizedPods"] == 1)
    wait_for("the function to be Ready", lambda: _ready(cluster, "NetworkFunction", "mark"))
    by_name = {p.k8s_name: p for p in agent.node.pods.values()}
    assert by_name["client"].ingress == [cube_name("web", "mark")]  # traffic from the pod
    r = cluster.probe("client", ["tcp", cluster.pods["web-1"].ip, "8080", "--timeout", "3"])
    assert r["ok"], r
    status = agent.node_status()["functions"][cube_name("web", "mark")]
    assert status["type"] == "dscp-marker" and status["params"]["dscp"] == 46
    assert status["counters"]["marked"] >= 1, status
    used = wait_for("usedBy in the CubeType's status", lambda: _cubetype_status(
        cluster, "dscp-marker")["nodes"][cluster.node]["usedBy"])
    assert used == ["web/mark"]

    delete(cluster.api, fixed)
    why = wait_for("the deleted type's report", lambda: (
        w := _not_ready(cluster, "NetworkFunction", "mark")) and w[0] == "CubeTypeDeleted" and w)
    assert cube_name("web", "mark") in agent.node.rt.cubes  # the data path as it was
    delete(cluster.api, chain)
    delete(cluster.api, nf)
    wait_for("the cube and its type to go", lambda: cube_name("web", "mark")
             not in agent.node.rt.cubes and "cubetype.dscp-marker" not in agent.node.rt.types)
