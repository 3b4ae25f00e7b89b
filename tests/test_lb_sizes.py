"""The service tables' sizes from the ConfigMap (lbServiceMapMax,
lbBackendMapMax) down to the compile flags, without a kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from pcn_agent.control.settings import ClusterSettings
from pcn_agent.dataplane.compiler import cflags
from pcn_agent.dataplane.cubes.lbrp import MAX_TABLE_ENTRIES, LbSizes
from pcn_agent.dataplane.runtime import Runtime
from pcn_agent.node.wiring import NodeConfig, NodeDataplane
from pcn_bpf import INCLUDE_DIR


def test_defaults_hold_100000_services_of_5_backends() -> None:
    s = ClusterSettings()
    assert s.lb_sizes == LbSizes()
    assert s.lbServiceMapMax >= 100_000 and s.lbBackendMapMax >= 5 * 100_000
    # the header's own defaults (a build outside the agent) are the same
    header = (INCLUDE_DIR / "pcn_lb.h").read_text()
    assert f"#define PCN_LB_SERVICES_MAX {s.lbServiceMapMax}\n" in header
    assert f"#define PCN_LB_BACKENDS_MAX {s.lbBackendMapMax}\n" in header


def test_configmap_strings_become_sizes(tmp_path: Path) -> None:
    for key, value in {"lbServiceMapMax": "200000", "lbBackendMapMax": "2000000"}.items():
        (tmp_path / key).write_text(value + "\n")  # as the kubelet mounts a ConfigMap
    s = ClusterSettings.load(tmp_path)
    assert s.lb_sizes == LbSizes(services=200_000, backends=2_000_000)
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"lbServiceMapMax": 16}))
    assert ClusterSettings.load(f).lb_sizes == LbSizes(services=16)


@pytest.mark.parametrize("key", ["lbServiceMapMax", "lbBackendMapMax"])
@pytest.mark.parametrize("value", ["0", "15", str(MAX_TABLE_ENTRIES + 1), "lots"])
def test_sizes_out_of_bounds_are_refused_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ValidationError, match=key):
        ClusterSettings.model_validate({key: value})


def test_sizes_are_passed_as_integer_defines(tmp_path: Path) -> None:
    flags = cflags(tmp_path, LbSizes(services=70_000, backends=350_000).defines())
    assert "-DPCN_LB_SERVICES_MAX=70000" in flags and "-DPCN_LB_BACKENDS_MAX=350000" in flags
    assert flags[0] == f'-DPCN_PIN_DIR="{tmp_path}"'


def test_a_node_builds_its_runtime_with_its_sizes(tmp_path: Path) -> None:
    sizes = LbSizes(services=300_000, backends=1_500_000)
    cfg = NodeConfig(name="n1", netns="n1", uplink="eth0", node_ip="192.168.1.2",
                     pod_cidr="10.244.1.0/24", vtep="10.18.0.1/16", lb_sizes=sizes)
    node = NodeDataplane(cfg, tmp_path, tmp_path)
    assert node.rt.defines == sizes.defines()
    # a runtime prepared ahead with other sizes is not this node's
    other = Runtime("n1", "n1", tmp_path, tmp_path, defines=LbSizes().defines())
    with pytest.raises(ValueError, match="PCN_LB_SERVICES_MAX"):
        NodeDataplane(cfg, tmp_path, tmp_path, prepared=other)
    same = Runtime("n1", "n1", tmp_path, tmp_path, defines=sizes.defines())
    assert NodeDataplane(cfg, tmp_path, tmp_path, prepared=same).rt is same


def test_agent_says_changed_table_sizes_need_a_restart(tmp_path: Path) -> None:
    """The sizes are compiled in: a changed ConfigMap takes effect when the
    agent restarts, which its status says."""
    from pcn_agent.control.agent import Agent

    agent = Agent("n1", ClusterSettings(), kube=None)  # type: ignore[arg-type]
    cm = tmp_path / "config"
    cm.mkdir()
    (cm / "lbServiceMapMax").write_text(str(LbSizes().services))
    assert agent.restart_needed(cm) == ""
    (cm / "lbServiceMapMax").write_text("262144")
    (cm / "lbBackendMapMax").write_text("2097152")
    msg = agent.restart_needed(cm)
    assert msg.startswith("the ConfigMap changed (lbServiceMapMax 131072 -> 262144, "
                          "lbBackendMapMax 1048576 -> 2097152)")
