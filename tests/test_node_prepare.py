"""prepare_runtime: what the agent does before its Node object arrives (open
the runtime, compile the node's cube types), and how a runtime treats pins it
finds. Each test has its own namespace, pin directory and state directory."""

from __future__ import annotations

import ctypes as ct
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from pcn_agent.dataplane import bpffs
from pcn_agent.dataplane.runtime import Runtime, RuntimeError_
from pcn_agent.node.wiring import BASE_TYPES, NodeConfig, NodeDataplane, prepare_runtime
from pcn_lab.topology import PREFIX


@dataclass
class Place:
    name: str
    pin_root: Path
    state_root: Path

    @property
    def pin_dir(self) -> Path:
        return self.pin_root / self.name

    @property
    def state_file(self) -> Path:
        return self.state_root / f"{self.name}.json"

    def runtime(self) -> Runtime:
        return Runtime(self.name, self.name, self.pin_root, self.state_root)


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Place]:
    name = f"{PREFIX}-{secrets.token_hex(4)}-prep"
    pr_netns.create(name)
    p = Place(name, bpffs.DEFAULT_ROOT, tmp_path / "state")
    try:
        yield p
    finally:
        bpffs.remove_instance(p.pin_dir)
        pr_netns.remove(name)
    assert not p.pin_dir.exists()


def _slot_fds(rt: Runtime) -> dict[int, bool]:
    progs = rt.table("pcn_progs")
    return {t.slot: ct.c_int(t.slot) in progs for t in rt.types.values()}


def test_prepare_compiles_the_base_types_into_slots(place: Place) -> None:
    rt = prepare_runtime(place.name, place.name, place.pin_root, place.state_root)
    try:
        assert rt.is_open and not rt.adopted
        assert set(rt.types) == set(BASE_TYPES)
        slots = [t.slot for t in rt.types.values()]
        assert len(set(slots)) == len(slots)
        assert all(_slot_fds(rt).values())  # each program is in the program array
        # one compile for the entry programs and every base type
        assert all(t.module is rt._entry for t in rt.types.values())
        assert not rt.cubes  # nothing is built before the node's configuration is known
    finally:
        rt.close()
    assert not place.pin_dir.exists()


def test_prepared_runtime_must_be_the_nodes(place: Place) -> None:
    rt = prepare_runtime(place.name, place.name, place.pin_root, place.state_root)
    try:
        cfg = NodeConfig(name="another-node", netns=place.name, uplink="eth0",
                         node_ip="192.168.0.1", pod_cidr="10.244.1.0/24", vtep="10.18.0.1/16")
        with pytest.raises(ValueError, match="not node another-node's"):
            NodeDataplane(cfg, place.pin_root, place.state_root, prepared=rt)
        with pytest.raises(RuntimeError_, match="already open"):
            rt.open()
    finally:
        rt.close()


def test_pins_without_saved_state_are_not_inherited(place: Place) -> None:
    """An agent that died before its first save left tables no state describes:
    the next start removes them rather than build on stale entries."""
    old = place.runtime().open()
    old.table("pcn_progs")[ct.c_int(7)] = ct.c_int(old._entry_fds["pcn_ingress"])
    old.abandon()  # as a killed agent: pins stay, no state file
    assert place.pin_dir.is_dir() and not place.state_file.exists()
    rt = prepare_runtime(place.name, place.name, place.pin_root, place.state_root)
    try:
        assert not rt.adopted
        assert ct.c_int(7) not in rt.table("pcn_progs")
    finally:
        rt.close()


def test_prepare_adopts_a_saved_data_plane(place: Place) -> None:
    old = place.runtime().open()
    old.add_cube("b0", "bridge")
    old.save()
    slot = old.types["bridge"].slot
    old.abandon()
    rt = prepare_runtime(place.name, place.name, place.pin_root, place.state_root)
    try:
        assert rt.adopted
        assert set(rt.types) == {"bridge"}  # what was there, in its slot; nothing more loaded
        assert rt.types["bridge"].slot == slot and "b0" in rt.cubes
    finally:
        rt.close()


def test_failed_prepare_leaves_nothing(place: Place, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Runtime.load_type

    def failing(self: Runtime, type_name: str):
        if type_name == BASE_TYPES[2]:
            raise RuntimeError_("injected compile failure")
        return real(self, type_name)

    monkeypatch.setattr(Runtime, "load_type", failing)
    with pytest.raises(RuntimeError_, match="injected"):
        prepare_runtime(place.name, place.name, place.pin_root, place.state_root)
    assert not place.pin_dir.exists()
    assert not place.state_file.exists()


def test_failed_adopting_prepare_keeps_the_data_plane(place: Place,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that cannot adopt must not tear down the data plane it found:
    the pods keep their traffic and the next try adopts it."""
    old = place.runtime().open()
    old.add_cube("b0", "bridge")
    old.save()
    old.abandon()

    def failing(self: Runtime, state: dict) -> None:
        raise RuntimeError_("injected adopt failure")

    monkeypatch.setattr(Runtime, "_adopt", failing)
    with pytest.raises(RuntimeError_, match="injected"):
        prepare_runtime(place.name, place.name, place.pin_root, place.state_root)
    assert place.state_file.exists() and (place.pin_dir / "progs").exists()
    monkeypatch.undo()
    rt = prepare_runtime(place.name, place.name, place.pin_root, place.state_root)
    try:
        assert rt.adopted and "b0" in rt.cubes
    finally:
        rt.close()
