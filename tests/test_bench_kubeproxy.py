"""bench.kubeproxy: the upstream kube-proxy as the services reference.

Unit tests for what is rendered (KubeProxyConfiguration, kubeconfig, Service
and EndpointSlice objects) and for the readiness detection on rules as
kube-proxy v1.37.2 writes them (captured from its iptables and nftables
modes); then, with `make k8s`'s binaries, the real thing: a bench API server
and kube-proxy in a node namespace with two pods on a Linux bridge, a Service
created through the API, and a pod's request to its ClusterIP answered by
the backend through kube-proxy's rules, in both modes."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import kubeproxy as kp
from bench import rr
from bench.kubeproxy import ServicePort
from bench.netns import Namespaces, new_run_prefix, stop
from bench.references import LinuxBridgeCNI
from bench.results import Result, acceptance, table
from pcn_agent.node import podnet

SVC = [ServicePort("bench", "svc", "rr", "10.96.0.10", 80, "tcp",
                   (("10.245.1.3", 8080), ("10.245.1.4", 8080))),
       ServicePort("bench", "svc", "iperf", "10.96.0.10", 5201, "tcp",
                   (("10.245.1.3", 5201), ("10.245.1.4", 5201)))]

# `iptables-save -t nat` after kube-proxy v1.37.2 (iptables mode) synced SVC
# with one endpoint each (trimmed to the lines that matter).
IPT_ONE = """*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SEP-FLZP6Z6K5IJWV7M6 -p tcp -m comment --comment "bench/svc:rr" -m tcp -j DNAT --to-destination 10.245.1.3:8080
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "bench/svc:rr cluster IP" -m tcp --dport 80 -j KUBE-SVC-JLKFWEKCODZZ63WU
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "bench/svc:iperf cluster IP" -m tcp --dport 5201 -j KUBE-SVC-TAUXWZS6GUH27HHA
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-JLKFWEKCODZZ63WU ! -s 10.245.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "bench/svc:rr cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-JLKFWEKCODZZ63WU -m comment --comment "bench/svc:rr -> 10.245.1.3:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-FLZP6Z6K5IJWV7M6
-A KUBE-SVC-JLKFWEKCODZZ63WU -m comment --comment "bench/svc:rr -> 10.245.1.4:8080" -j KUBE-SEP-AAAAAAAAAAAAAAAA
-A KUBE-SVC-TAUXWZS6GUH27HHA -m comment --comment "bench/svc:iperf -> 10.245.1.3:5201" -j KUBE-SEP-5IJA75QLSPRGLYN5
-A KUBE-SEP-AAAAAAAAAAAAAAAA -p tcp -m comment --comment "bench/svc:rr" -m tcp -j DNAT --to-destination 10.245.1.4:8080
-A KUBE-SEP-5IJA75QLSPRGLYN5 -p tcp -m comment --comment "bench/svc:iperf" -m tcp -j DNAT --to-destination 10.245.1.3:5201
COMMIT
"""  # noqa: E501

# `nft list table ip kube-proxy` (nftables mode), trimmed.
NFT = """table ip kube-proxy {
    map no-endpoint-services {
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = { 10.96.0.1 . tcp . 443 comment "default/kubernetes:https" : goto reject-chain }
    }

    map service-ips {
        type ipv4_addr . inet_proto . inet_service : verdict
        comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
        elements = { 10.96.0.10 . tcp . 80 : goto service-4TG2FWAP-bench/svc/tcp/rr,
                 10.96.0.10 . tcp . 5201 : goto service-GOA2ITM4-bench/svc/tcp/iperf }
    }

    chain service-4TG2FWAP-bench/svc/tcp/rr {
        ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.245.0.0/16 jump mark-for-masquerade
        meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.245.1.3 . 8080, 1 : 10.245.1.4 . 8080 }
    }

    chain service-GOA2ITM4-bench/svc/tcp/iperf {
        meta l4proto tcp dnat to 10.245.1.3:5201
    }
}
"""  # noqa: E501


def test_proxy_config_sets_mode_node_cidr_and_loopback_endpoints() -> None:
    cfg = kp.proxy_config("nftables", "node-a", "10.245.0.0/16", Path("/x/kubeconfig"), 1, 2)
    assert cfg["apiVersion"] == "kubeproxy.config.k8s.io/v1alpha1"
    assert cfg["kind"] == "KubeProxyConfiguration"
    assert (cfg["mode"], cfg["hostnameOverride"], cfg["clusterCIDR"]) == (
        "nftables", "node-a", "10.245.0.0/16")
    assert cfg["detectLocalMode"] == "ClusterCIDR"
    assert cfg["clientConnection"]["kubeconfig"] == "/x/kubeconfig"
    assert cfg["metricsBindAddress"] == "127.0.0.1:1" and cfg["healthzBindAddress"] == "127.0.0.1:2"
    # rules at once, and nothing machine-wide touched
    assert cfg["nftables"]["minSyncPeriod"] == "0s" == cfg["iptables"]["minSyncPeriod"]
    assert cfg["conntrack"]["maxPerCore"] == 0 and cfg["conntrack"]["min"] == 0
    json.dumps(cfg)  # written as JSON, which kube-proxy reads as YAML


def test_proxy_config_refuses_other_modes() -> None:
    with pytest.raises(ValueError, match="ipvs"):
        kp.proxy_config("ipvs", "n", "10.0.0.0/8", Path("k"), 1, 2)


def test_kubeconfig_has_server_and_token() -> None:
    kc = kp.kubeconfig("https://127.0.0.1:4321", "tok")
    ctx = kc["contexts"][0]["context"]
    assert kc["current-context"] == kc["contexts"][0]["name"]
    cluster = next(c["cluster"] for c in kc["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in kc["users"] if u["name"] == ctx["user"])
    assert cluster == {"server": "https://127.0.0.1:4321", "insecure-skip-tls-verify": True}
    assert user == {"token": "tok"}


def test_service_objects_one_service_and_slice_per_name() -> None:
    objs = kp.service_objects(SVC)
    assert [o["kind"] for o in objs] == ["Service", "EndpointSlice"]
    svc, eps = objs
    assert svc["spec"]["clusterIP"] == "10.96.0.10" and "selector" not in svc["spec"]
    assert svc["spec"]["ports"] == [
        {"name": "rr", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "iperf", "port": 5201, "targetPort": 5201, "protocol": "TCP"}]
    assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == "svc"
    assert eps["addressType"] == "IPv4"
    assert [e["addresses"] for e in eps["endpoints"]] == [["10.245.1.3"], ["10.245.1.4"]]
    assert all(e["conditions"]["ready"] for e in eps["endpoints"])
    assert eps["ports"] == [{"name": "rr", "port": 8080, "protocol": "TCP"},
                            {"name": "iperf", "port": 5201, "protocol": "TCP"}]
    assert kp.collection_path(svc) == "/api/v1/namespaces/bench/services"
    assert kp.collection_path(eps) == "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices"
    assert kp.collection_path({"apiVersion": "v1", "kind": "Node",
                               "metadata": {"name": "n"}}) == "/api/v1/nodes"


def test_service_objects_refuse_ports_with_other_endpoints() -> None:
    odd = [SVC[0], ServicePort("bench", "svc", "x", "10.96.0.10", 81, "tcp",
                               (("10.245.1.9", 8080),))]
    with pytest.raises(ValueError, match="bench/svc"):
        kp.service_objects(odd)


class _SlowApi(kp.ApiClient):
    """An ApiClient whose creates take `delay` s each and are recorded,
    without an API server."""

    def __init__(self, delay: float, fail_at: int = -1) -> None:
        super().__init__(0)
        self.delay, self.fail_at = delay, fail_at
        self.created: list[str] = []

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        if name == f"o{self.fail_at}":
            raise RuntimeError(f"409 {name} exists")
        time.sleep(self.delay)
        self.created.append(name)
        return obj


def _objs(n: int) -> list[dict[str, Any]]:
    return [{"metadata": {"name": f"o{i}"}} for i in range(n)]


def test_create_all_reports_progress_and_creates_everything() -> None:
    api = _SlowApi(0.01)
    seen: list[tuple[int, int]] = []
    secs = api.create_all(_objs(40), workers=2, every_s=0.05,
                          progress=lambda done, total, _s: seen.append((done, total)))
    assert sorted(api.created) == sorted(f"o{i}" for i in range(40))
    assert secs > 0
    assert seen and all(total == 40 and 0 <= done < 40 for done, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_create_all_stops_once_the_rate_projects_past_the_budget() -> None:
    api = _SlowApi(0.05)
    with pytest.raises(kp.CreateBudgetExceeded) as caught:
        # 400 creates at ~40/s on 2 workers: ~10 s, far past a 1 s budget
        api.create_all(_objs(400), workers=2, every_s=0.2, budget_s=1.0)
    exc = caught.value
    assert exc.total == 400 and 0 < exc.created < 400 and exc.projected_s > 1.0
    time.sleep(0.2)  # the creates in flight end; the queued ones never start
    assert len(api.created) < 60


def test_create_all_raises_a_failed_create() -> None:
    api = _SlowApi(0.0, fail_at=5)
    with pytest.raises(RuntimeError, match="409 o5 exists"):
        api.create_all(_objs(20), workers=2, every_s=0.05)


def test_iptables_readiness() -> None:
    services, endpoints = kp.programmed(IPT_ONE, "iptables")
    assert services == {("10.96.0.10", 80), ("10.96.0.10", 5201)}
    assert ("10.96.0.10", 80, "10.245.1.4", 8080) in endpoints
    assert kp.missing(IPT_ONE, "iptables", SVC, SVC[:1]) == []
    # the second endpoint of iperf is not there yet
    assert kp.missing(IPT_ONE, "iptables", SVC, SVC) == ["bench/svc:iperf -> 10.245.1.4:5201"]
    other = ServicePort("bench", "other", "http", "10.96.0.11", 80, "tcp", (("10.245.1.3", 1),))
    assert kp.missing(IPT_ONE, "iptables", [other]) == ["bench/other:http 10.96.0.11:80"]
    # a service without endpoints has no service chain in any mode: not waited for
    empty = ServicePort("bench", "e", "http", "10.96.0.12", 80, "tcp", ())
    assert kp.missing("", "iptables", [empty]) == []
    assert kp.missing("", "iptables", SVC)  # nothing written yet


def test_iptables_readiness_without_comments() -> None:
    """Above 1000 endpoints kube-proxy leaves the endpoints' comments out."""
    bare = "\n".join(line.split(' -m comment --comment "')[0] + " -j " + line.split(" -j ")[-1]
                     if line.startswith(("-A KUBE-SVC-", "-A KUBE-SEP-")) else line
                     for line in IPT_ONE.splitlines())
    assert "->" not in bare and "DNAT" in bare
    assert kp.missing(bare, "iptables", SVC, SVC[:1]) == []


def test_nftables_readiness() -> None:
    services, endpoints = kp.programmed(NFT, "nftables")
    assert services == {("10.96.0.10", 80), ("10.96.0.10", 5201)}  # not the reject element
    assert endpoints == {("10.96.0.10", 80, "10.245.1.3", 8080),
                         ("10.96.0.10", 80, "10.245.1.4", 8080),
                         ("10.96.0.10", 5201, "10.245.1.3", 5201)}
    assert kp.missing(NFT, "nftables", SVC, SVC[:1]) == []
    assert kp.missing(NFT, "nftables", SVC, SVC) == ["bench/svc:iperf -> 10.245.1.4:5201"]
    chained = NFT.replace("dnat to 10.245.1.3:5201", "numgen random mod 2 vmap { "
                          "0 : goto endpoint-AB-bench/svc/tcp/iperf__10.245.1.3/5201, "
                          "1 : goto endpoint-CD-bench/svc/tcp/iperf__10.245.1.4/5201 }")
    assert kp.missing(chained, "nftables", SVC, SVC) == []
    with pytest.raises(ValueError):
        kp.programmed(NFT, "ipvs")


def test_parse_metrics() -> None:
    text = ("# HELP x\n# TYPE x counter\n"
            'kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 3\n'
            "kubeproxy_sync_proxy_rules_service_changes_total 4\nbad line here\n")
    m = kp.parse_metrics(text)
    assert m == {'kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}': 3.0,
                 "kubeproxy_sync_proxy_rules_service_changes_total": 4.0}


def test_acceptance_and_table_name_both_kube_proxy_modes() -> None:
    res = [Result("pod-to-service", "pcn", "throughput", 10.0, "Gbit/s"),
           Result("pod-to-service", "kube-proxy-nftables", "throughput", 8.0, "Gbit/s"),
           Result("pod-to-service", "kube-proxy-iptables", "throughput", 5.0, "Gbit/s")]
    line = next(x for x in acceptance(res) if "pod-to-service" in x)
    assert "125% of kube-proxy-nftables" in line and "200% of kube-proxy-iptables" in line
    assert line.endswith("PASS")
    pcn_row = table(res).splitlines()[2]
    assert "125%" in pcn_row and "200%" in pcn_row
    rates = [Result("pod-to-service", v, "tcp-rr", x, "trans/s")
             for v, x in (("pcn", 11000.0), ("kube-proxy-nftables", 10000.0),
                          ("kube-proxy-iptables", 8000.0))]
    rr_line = next(x for x in acceptance(rates) if "TCP_RR" in x)
    assert "110% of kube-proxy-nftables, 138% of kube-proxy-iptables" in rr_line
    assert rr_line.endswith("FAIL")  # the target is 115%


# --- the real kube-proxy ---


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Namespaces, kp.ControlPlane, Path]]:
    missing_bins = kp.binaries_missing()
    if missing_bins:
        pytest.skip(f"{kp.bin_dir()} lacks {missing_bins}: run `make k8s`")
    if shutil.which("nft") is None:
        pytest.skip("nft not installed (apt-get install nftables; make setup does)")
    nss = Namespaces(new_run_prefix())
    tmp = Path(tempfile.mkdtemp(prefix=f"{nss.prefix}-"))
    control = kp.ControlPlane(nss.create("api"), tmp / "control", kp.bin_dir())
    try:
        api = control.start()
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}})
        yield nss, control, tmp
    finally:
        control.close()
        nss.remove_all()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("mode", kp.MODES)
def test_cluster_ip_answered_through_kube_proxys_rules(
        cluster: tuple[Namespaces, kp.ControlPlane, Path], mode: str) -> None:
    nss, control, tmp = cluster
    assert control.client is not None
    node = nss.create(f"node-{mode[:3]}")
    pods = [f"{nss.prefix}-{p}-{mode[:3]}" for p in ("c", "b")]
    cni = LinuxBridgeCNI(nss, node, tmp / f"host-local-{mode}", 1450)
    proxy: kp.KubeProxy | None = None
    server = None
    try:
        client, backend = cni.add_pod(f"c-{mode[:3]}"), cni.add_pod(f"b-{mode[:3]}")
        podnet.write_sysctl(node, "net.ipv4.ip_forward", "1")
        podnet.write_sysctl(node, "net.bridge.bridge-nf-call-iptables", "1")
        server = rr.start_server(backend.netns, "backend")
        vip = "10.96.0.20" if mode == "iptables" else "10.96.0.21"
        sp = ServicePort("bench", f"web-{mode}", "http", vip, 80, "tcp",
                         ((backend.ip, rr.PORT),))
        # before kube-proxy: nothing answers on the ClusterIP
        with pytest.raises(RuntimeError):
            rr.run_client(client.netns, vip, 80, 1, timeout=0.5)
        control.client.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                               "status": {"addresses": [{"type": "InternalIP",
                                                         "address": "10.245.1.1"}]}})
        control.client.create_all(kp.service_objects([sp]))
        proxy = kp.KubeProxy(node, mode, node, "10.245.0.0/16", control.relay_into(node, mode),
                             tmp / f"kube-proxy-{mode}", kp.bin_dir())
        proxy.start()
        took = proxy.wait_programmed([sp], [sp], timeout=120)
        assert 0 < took < 120  # start to the end of the sync that wrote the rules
        report = rr.run_client(client.netns, vip, 80, 20)
        assert report["hosts"] == {"backend": 20}
        metrics = proxy.metrics()
        assert metrics.get('kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}',
                           0) >= 1
        assert kp.rule_count(node, mode) > 0
        proxy.cleanup()  # its rules are gone, the ClusterIP no longer answers
        assert kp.missing(kp.rules_text(node, mode), mode, [sp]) != []
        with pytest.raises(RuntimeError):
            rr.run_client(client.netns, vip, 80, 1, timeout=0.5)
    finally:
        if proxy is not None:
            proxy.cleanup()
        if server is not None:
            stop(server)
        cni.delete_all()
        for ns in [*pods, node]:
            nss.remove(ns)
