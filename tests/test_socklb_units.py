"""Where the agent attaches socket load balancing (ConfigMap socketLB,
socketLBCgroup; the kubelet's pods cgroup under PCN_CGROUP_ROOT)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pcn_agent.control.agent import socket_lb_cgroup
from pcn_agent.control.settings import ClusterSettings
from pcn_agent.dataplane.socklb import SocketLBError, cgroup2_mount, kubelet_pods_cgroup


def test_off_in_the_configmap_means_no_cgroup(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    (tmp_path / "kubepods.slice").mkdir()
    monkeypatch.setenv("PCN_CGROUP_ROOT", str(tmp_path))
    assert socket_lb_cgroup(ClusterSettings.model_validate({"socketLB": "false"})) is None
    assert socket_lb_cgroup(ClusterSettings()) == str(tmp_path / "kubepods.slice")


def test_an_explicit_cgroup_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCN_CGROUP_ROOT", raising=False)
    s = ClusterSettings.model_validate({"socketLBCgroup": "/sys/fs/cgroup/pods"})
    assert socket_lb_cgroup(s) == "/sys/fs/cgroup/pods"
    for bad in ("pods", "/sys/fs/cgroup/../x"):
        with pytest.raises(ValidationError):
            ClusterSettings.model_validate({"socketLBCgroup": bad})


@pytest.mark.parametrize("layout", ["kubepods.slice", "kubepods", "unified/kubepods.slice"])
def test_kubelet_pods_cgroup_by_driver_and_hierarchy(tmp_path: Path, layout: str) -> None:
    (tmp_path / layout).mkdir(parents=True)
    assert kubelet_pods_cgroup(tmp_path) == tmp_path / layout


def test_no_pods_cgroup_turns_socket_lb_off(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    with pytest.raises(SocketLBError):
        kubelet_pods_cgroup(tmp_path)
    monkeypatch.setenv("PCN_CGROUP_ROOT", str(tmp_path))
    assert socket_lb_cgroup(ClusterSettings()) is None


def test_cgroup2_mount_from_the_mount_table(tmp_path: Path) -> None:
    hybrid = tmp_path / "mounts"
    hybrid.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"
                      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert cgroup2_mount(hybrid) == Path("/sys/fs/cgroup/unified")
    hybrid.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n")
    with pytest.raises(SocketLBError):
        cgroup2_mount(hybrid)
