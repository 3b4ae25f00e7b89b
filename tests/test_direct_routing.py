"""Direct routing (ConfigMap overlay "none") without a data plane: the
settings, the peers the reconciler computes and the routes the node wiring
makes of them (wiring.peer_routes), next to VXLAN's."""

from __future__ import annotations

from typing import Any

import pytest

from pcn_agent.control.reconcile import Inputs, desired_state, peers_of
from pcn_agent.control.settings import ClusterSettings
from pcn_agent.node.wiring import NodeConfig, PeerNode, PeerRoute, peer_routes


def node(name: str, ip: str, cidr: str, **annotations: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "annotations": annotations},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


NODES = [node("n1", "192.168.1.1", "10.244.1.0/24"), node("n2", "192.168.1.2", "10.244.2.0/24"),
         node("far", "172.16.0.9", "10.244.3.0/24"), node("new", "192.168.1.4", "")]


def cfg(overlay: str, gateway: str | None = None) -> NodeConfig:
    return NodeConfig("n1", None, "eth0", "192.168.1.1", "10.244.1.0/24",
                      "10.18.0.1/16" if overlay == "vxlan" else "", overlay=overlay,
                      default_gateway=gateway)


def test_settings_overlay_and_the_pod_mtu_it_implies() -> None:
    assert ClusterSettings().overlay == "vxlan"
    assert ClusterSettings().pod_mtu == 1450  # 1500 less VXLAN's 50 bytes (RFC 7348)
    assert ClusterSettings(overlay="none").pod_mtu == 1500  # nothing added
    assert ClusterSettings(overlay="direct").overlay == "none"  # the earlier name
    assert ClusterSettings(overlay="none", mtu="9000").pod_mtu == 9000  # set: kept
    assert ClusterSettings(mtu="auto").mtu is None
    assert ClusterSettings(mtu="").pod_mtu == 1450  # an empty ConfigMap value: auto
    with pytest.raises(ValueError, match="overlay"):
        ClusterSettings(overlay="geneve")
    with pytest.raises(ValueError):
        ClusterSettings(mtu="100")


def test_peers_over_vxlan_have_vteps_and_direct_ones_none() -> None:
    vx = {p.name: p for p in peers_of(Inputs("n1", ClusterSettings(), nodes=NODES))}
    assert vx["n2"] == PeerNode("n2", "192.168.1.2", "10.244.2.0/24", "10.18.0.2")
    assert "new" not in vx  # no pod CIDR yet
    direct = {p.name: p for p in
              peers_of(Inputs("n1", ClusterSettings(overlay="none"), nodes=NODES))}
    assert direct["n2"] == PeerNode("n2", "192.168.1.2", "10.244.2.0/24", "")
    assert set(direct) == {"n1", "n2", "far"}
    # a pod CIDR outside the cluster's has no VTEP: VXLAN leaves it out, direct
    # routing does not need one
    odd = [node("odd", "192.168.1.7", "10.250.0.0/24")]
    assert not peers_of(Inputs("n1", ClusterSettings(), nodes=odd))
    assert {p.name for p in peers_of(Inputs("n1", ClusterSettings(overlay="none"),
                                            nodes=odd))} == {"odd"}
    r = desired_state(Inputs("n1", ClusterSettings(overlay="none"), nodes=NODES))
    assert r.desired.peers == frozenset(direct.values())


def test_routes_over_vxlan_go_to_vteps() -> None:
    peers = peers_of(Inputs("n1", ClusterSettings(), nodes=NODES))
    routes, skipped = peer_routes(cfg("vxlan"), peers, "192.168.1.0/24")
    assert routes == {"n2": PeerRoute("10.244.2.0/24", "vxlan", "10.18.0.2"),
                      "far": PeerRoute("10.244.3.0/24", "vxlan", "10.18.0.3")}
    assert skipped == {}


def test_direct_routes_go_to_l2_neighbours_node_ips() -> None:
    peers = peers_of(Inputs("n1", ClusterSettings(overlay="none"), nodes=NODES))
    routes, skipped = peer_routes(cfg("none"), peers, "192.168.1.0/24")
    assert routes == {"n2": PeerRoute("10.244.2.0/24", "uplink", "192.168.1.2")}
    assert "n1" not in routes  # itself
    assert "L2 adjacency" in skipped["far"] and "172.16.0.9" in skipped["far"]


def test_direct_routes_to_other_segments_go_through_the_gateway() -> None:
    peers = peers_of(Inputs("n1", ClusterSettings(overlay="none"), nodes=NODES))
    routes, skipped = peer_routes(cfg("none", gateway="192.168.1.254"), peers, "192.168.1.0/24")
    assert routes["far"] == PeerRoute("10.244.3.0/24", "uplink", "192.168.1.254")
    assert routes["n2"].nexthop == "192.168.1.2"
    assert skipped == {}


def test_node_config_return_address_follows_the_overlay() -> None:
    assert cfg("vxlan").return_ip == "10.18.0.1"
    assert cfg("none").return_ip == "10.244.1.0"  # the pod CIDR's network address
    assert cfg("none").vtep_ip == ""
    with pytest.raises(ValueError, match="VTEP"):
        NodeConfig("n1", None, "eth0", "192.168.1.1", "10.244.1.0/24", "")
    with pytest.raises(ValueError, match="overlay"):
        NodeConfig("n1", None, "eth0", "192.168.1.1", "10.244.1.0/24", "", overlay="gre")


def test_bench_cross_node_acceptance_compares_each_mode_with_its_underlay() -> None:
    from bench.results import THROUGHPUT, Result, acceptance

    def tp(variant: str, gbps: float) -> Result:
        return Result("pod-to-pod-cross-node", variant, THROUGHPUT, gbps, "Gbit/s",
                      {"loadavg_after": "0.10 0.20 0.30"})

    lines = [x for x in acceptance([tp("pcn", 8.9), tp("veth", 10.0), tp("pcn-direct", 9.6),
                                    tp("veth-1500", 10.0), tp("vxlan-kernel", 9.5)])
             if "cross-node" in x]
    assert len(lines) == 2
    assert "VXLAN 8.90 Gbit/s = 89% of the underlay's 10.00 (veth; target >= 90%): FAIL; " \
        "the kernel's VXLAN alone 9.50 Gbit/s = 95% of it" in lines[0]
    assert "direct routing 9.60 Gbit/s = 96%" in lines[1] and lines[1].endswith(
        "PASS (load 0.10 0.20 0.30)")


def test_agent_says_a_changed_overlay_needs_a_restart(tmp_path, caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    """The mounted ConfigMap changes under a running agent: its status and
    its log say what a restart would apply, once per change."""
    from pcn_agent.control.agent import Agent

    agent = Agent("n1", ClusterSettings(), kube=None)  # type: ignore[arg-type]
    cm = tmp_path / "config"
    cm.mkdir()
    (cm / "overlay").write_text("vxlan")
    assert agent.restart_needed(cm) == ""
    (cm / "overlay").write_text("none")
    with caplog.at_level("WARNING", logger="pcn_agent.control.agent"):
        msg = agent.restart_needed(cm)
        assert agent.restart_needed(cm) == msg
    assert msg.startswith("the ConfigMap changed (overlay vxlan -> none, pod MTU 1450 -> 1500)")
    assert "rollout restart" in msg
    assert len([m for m in caplog.messages if "ConfigMap changed" in m]) == 1
    (cm / "overlay").write_text("bogus")  # unreadable: the restart will name it
    assert agent.restart_needed(cm) == ""
    assert agent.restart_needed(tmp_path / "absent") == ""  # nothing mounted: nothing to say
