"""The node's service table (cubes/lbrp.ServiceTable) without a kernel: its
maps stand in as dicts, which is all the table asks of them."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from pcn_agent.dataplane.cubes.lbrp import (
    BACKENDS_SETTING,
    SERVICES_SETTING,
    Backend,
    LbSizes,
    ServiceTable,
    TableFullError,
)


class _Map:
    """A BPF table as BCC shows it: ctypes keys and values (unhashable), and
    a kernel hash map's bound: E2BIG (OSError, as BCC raises it) on a new
    key when `max_entries` are in."""

    def __init__(self, max_entries: int = 1 << 20) -> None:
        self.entries: dict[bytes, tuple[object, object]] = {}
        self.max_entries = max_entries

    def __setitem__(self, key: object, value: object) -> None:
        raw = bytes(key)  # type: ignore[call-overload]
        if raw not in self.entries and len(self.entries) >= self.max_entries:
            raise OSError(7, "Argument list too long")
        self.entries[raw] = (key, value)

    def __delitem__(self, key: object) -> None:
        del self.entries[bytes(key)]  # type: ignore[call-overload]

    def items(self) -> list[tuple[object, object]]:
        return list(self.entries.values())

    def keys(self) -> list[object]:
        return [k for k, _ in self.entries.values()]


class _Runtime:
    """Tables sized as pcn_lb.h sizes them from LbSizes; `resized`: those
    Runtime.open() made anew."""

    def __init__(self, sizes: LbSizes | None = None,
                 resized: frozenset[str] = frozenset()) -> None:
        self.sizes = sizes or LbSizes()
        self.resized = set(resized)
        self.tables: dict[str, _Map] = {}

    def table(self, name: str, cube_type: str) -> _Map:
        size = {"lb_services": self.sizes.services, "lb_vips": self.sizes.services,
                "lb_slots": self.sizes.backends}.get(name, 1 << 20)
        return self.tables.setdefault(name, _Map(size))


def _table(state: dict | None = None, rt: _Runtime | None = None) -> ServiceTable:
    return ServiceTable(rt or _Runtime(), "lbrp", state)  # type: ignore[arg-type]


def test_snapshot_is_asdict_of_every_service() -> None:
    t = _table()
    t.set("10.96.0.1", 80, "tcp", [Backend("10.244.1.2", 8080, 3), Backend("10.244.1.3", 8080)])
    t.set("10.96.0.2", 53, "UDP", [Backend("10.244.1.4", 53)], affinity_timeout_s=30)
    t.set("10.96.0.3", 443, "tcp", [])
    assert t.snapshot() == {"services": [asdict(s) for s in t.services.values()]}


def test_state_round_trip_keeps_services_and_free_ids() -> None:
    t = _table()
    for i in range(5):
        t.set(f"10.96.0.{i + 1}", 80, "tcp", [Backend("10.244.1.2", 8080)])
    assert t.delete("10.96.0.2", 80, "tcp")
    again = _table(t.snapshot())
    assert again.services == t.services
    used = {s.id for s in t.services.values()}
    assert again._free_ids == t._free_ids == [2]
    assert again._next_id == t._next_id == max(used) + 1
    # the next new service gets the id that was freed, restarted or not
    assert again.set("10.96.0.9", 80, "tcp", []).id == t.set("10.96.0.9", 80, "tcp", []).id == 2


def _vips(t: ServiceTable) -> set[str]:
    from pcn_agent.dataplane import maps

    return {maps.ip_str(k.value) for k in t._vips.keys()}  # type: ignore[attr-defined]


def test_service_addresses_are_listed_while_they_have_an_internal_port() -> None:
    """lb_vips holds every address with a service port (the lbrp rejects the
    other ports of those and drops the rest of the Service range); a
    NodePort's external entry adds nothing to it, and a restarted table
    lists the same addresses."""
    t = _table()
    t.set("10.96.0.1", 80, "tcp", [])
    t.set("10.96.0.1", 53, "udp", [])
    t.set("10.96.0.2", 80, "tcp", [])
    t.set("192.168.1.10", 30080, "tcp", [Backend("10.244.1.2", 8080)])
    t.set("192.168.1.10", 30080, "tcp", [], external=True, drop_if_empty=True)
    assert _vips(t) == {"10.96.0.1", "10.96.0.2", "192.168.1.10"}
    assert t.delete("10.96.0.1", 80, "tcp")
    assert _vips(t) == {"10.96.0.1", "10.96.0.2", "192.168.1.10"}
    assert t.delete("10.96.0.1", 53, "udp")
    assert t.delete("192.168.1.10", 30080, "tcp", external=True)
    assert _vips(t) == {"10.96.0.2", "192.168.1.10"}
    assert not t.delete("192.168.1.10", 30080, "tcp", external=True)

    t.set("192.168.1.10", 30080, "tcp", [], external=True, drop_if_empty=True)
    again = _table(t.snapshot())
    assert again.services == t.services and again.external == t.external
    assert again.external[("192.168.1.10", 30080, "tcp")].drop_if_empty
    assert _vips(again) == _vips(t)


# ------------------------------------------------------------------ with a store
def _stored(path: Path, state: dict | None) -> ServiceTable:
    from pcn_agent.dataplane.servicestore import ServiceStore

    return ServiceTable(_Runtime(), "lbrp", state, ServiceStore(path))  # type: ignore[arg-type]


def test_store_holds_what_a_restarted_table_adopts(tmp_path: Path) -> None:
    """Each set() and delete() writes its own row; what was committed is
    what the next agent's table starts from (state {"store": true}, what
    LoadBalancer.save records), uncommitted writes included once the store
    is closed as an agent's shutdown closes it."""
    db = tmp_path / "n1.lbrp.services.sqlite"
    t = _stored(db, None)
    for i in range(6):
        t.set(f"10.96.0.{i + 1}", 80, "tcp", [Backend("10.244.1.2", 8080, i + 1)])
    t.set("192.168.1.10", 30080, "tcp", [], external=True, drop_if_empty=True)
    t.set("10.96.0.3", 80, "tcp", [Backend("10.244.1.9", 9090)], affinity_timeout_s=60)
    assert t.delete("10.96.0.2", 80, "tcp")
    assert t.store is not None
    t.store.commit()
    again = _stored(db, {"store": True})
    assert again.services == t.services and again.external == t.external
    assert again._free_ids == t._free_ids
    assert _vips(again) == _vips(t)
    # a store never committed since the last change still has the change after close()
    again.set("10.96.0.9", 53, "udp", [Backend("10.244.1.3", 53)])
    assert again.store is not None
    again.store.close()
    third = _stored(db, {"store": True})
    assert third.services == again.services


def test_store_starts_from_an_older_agents_state_or_from_nothing(tmp_path: Path) -> None:
    """An older agent saved its services in the state file: the store is
    filled from them. A table that adopts nothing (a fresh start) empties
    a store some earlier agent left."""
    old = _table()
    old.set("10.96.0.1", 80, "tcp", [Backend("10.244.1.2", 8080)])
    old.set("10.96.0.2", 443, "tcp", [])
    db = tmp_path / "n1.lbrp.services.sqlite"
    t = _stored(db, old.snapshot())
    assert t.services == old.services
    assert t.store is not None
    t.store.commit()
    assert _stored(db, {"store": True}).services == old.services
    fresh = _stored(db, None)
    assert fresh.services == {}
    assert fresh.store is not None
    fresh.store.commit()
    assert _stored(db, {"store": True}).services == {}


def test_store_remove_leaves_no_file(tmp_path: Path) -> None:
    db = tmp_path / "n1.lbrp.services.sqlite"
    t = _stored(db, None)
    t.set("10.96.0.1", 80, "tcp", [])
    assert t.store is not None
    t.store.commit()
    assert db.exists()
    t.store.remove()
    assert list(tmp_path.iterdir()) == []
def _svc_ids(rt: _Runtime) -> list[int]:
    return sorted(v.id for _, v in rt.tables["lb_services"].items())  # type: ignore[attr-defined]


def test_the_17th_service_of_a_16_entry_table_is_refused_naming_the_setting() -> None:
    """A full lb_services refuses a new service before anything of it is
    written (no slots, no address), with an error naming lbServiceMapMax;
    updating a service already in, and adding one after a delete, work."""
    rt = _Runtime(LbSizes(services=16, backends=1024))
    t = _table(rt=rt)
    for i in range(16):
        t.set(f"10.96.0.{i + 1}", 80, "tcp", [Backend("10.244.1.2", 8080)])
    slots_before = len(rt.tables["lb_slots"].entries)
    with pytest.raises(TableFullError) as err:
        t.set("10.96.0.17", 80, "tcp", [Backend("10.244.1.3", 8080), Backend("10.244.1.4", 8080)])
    assert err.value.setting == SERVICES_SETTING
    assert "lbServiceMapMax" in str(err.value) and "16" in str(err.value)
    assert len(rt.tables["lb_slots"].entries) == slots_before
    assert "10.96.0.17" not in _vips(t) and ("10.96.0.17", 80, "tcp") not in t.services
    assert _svc_ids(rt) == list(range(1, 17))
    # an update of a service already in needs no new entry
    t.set("10.96.0.16", 80, "tcp", [Backend("10.244.1.3", 8080), Backend("10.244.1.4", 8080)])
    assert t.delete("10.96.0.1", 80, "tcp")
    assert t.set("10.96.0.17", 80, "tcp", []).id == 1


def test_backends_beyond_the_slot_table_are_refused_naming_the_setting() -> None:
    """lb_slots holds the backends of all services: a service whose slots
    would overflow it is refused whole (lbBackendMapMax), an update that
    shrinks another makes room, and the count follows deletes and restarts."""
    rt = _Runtime(LbSizes(services=64, backends=16))
    t = _table(rt=rt)
    five = [Backend(f"10.244.1.{i}", 8080) for i in range(2, 7)]
    for i in range(3):
        t.set(f"10.96.0.{i + 1}", 80, "tcp", five)
    assert t.slots_used == 15
    with pytest.raises(TableFullError) as err:
        t.set("10.96.0.4", 80, "tcp", five[:2])
    assert err.value.setting == BACKENDS_SETTING and "lbBackendMapMax" in str(err.value)
    assert ("10.96.0.4", 80, "tcp") not in t.services and len(rt.tables["lb_slots"].entries) == 15
    # growing a service in place is bounded the same way, and leaves it as it was
    with pytest.raises(TableFullError):
        t.set("10.96.0.1", 80, "tcp", [*five, Backend("10.244.1.9", 8080),
                                        Backend("10.244.1.10", 8080)])
    assert t.services[("10.96.0.1", 80, "tcp")].backends == five
    t.set("10.96.0.1", 80, "tcp", five[:1])  # 11 used
    t.set("10.96.0.4", 80, "tcp", five)  # 16: full, fits exactly
    assert t.slots_used == len(rt.tables["lb_slots"].entries) == 16
    assert t.delete("10.96.0.2", 80, "tcp")
    assert t.slots_used == 11 and _table(t.snapshot(), rt).slots_used == 11


def test_ids_are_not_capped_at_16_bits() -> None:
    """Service ids are u32 in every map: a table of more than 65 535 entries
    hands out ids above 65 535 (the slot keys carry them), and a restarted
    table knows which ids are in use, however high."""
    rt = _Runtime(LbSizes(services=70000, backends=70000))
    t = _table(rt=rt)
    t._next_id = 65535  # as if 65 534 services had been added before
    a = t.set("10.96.0.1", 80, "tcp", [Backend("10.244.1.2", 8080)])
    b = t.set("10.96.0.2", 80, "tcp", [Backend("10.244.1.3", 8080)])
    assert (a.id, b.id) == (65535, 65536)
    assert {k.svc for k, _ in rt.tables["lb_slots"].items()} == {65535, 65536}  # type: ignore[attr-defined]
    again = _table(t.snapshot(), rt)
    assert again._next_id == 65537 and 65535 not in again._free_ids
    assert again.set("10.96.0.3", 80, "tcp", []).id == 1  # the lowest free id first


def test_resized_tables_are_filled_again_from_the_saved_state() -> None:
    """When Runtime.open() made the service tables anew (their size changed),
    the table writes every saved service into them again, slots and all."""
    t = _table()
    t.set("10.96.0.1", 80, "tcp", [Backend("10.244.1.2", 8080, 3), Backend("10.244.1.3", 8080)])
    t.set("10.96.0.2", 53, "udp", [], affinity_timeout_s=30, drop_if_empty=True)
    t.set("192.168.1.10", 30080, "tcp", [Backend("10.244.1.2", 8080)], external=True)
    old = t.rt.tables  # type: ignore[attr-defined]
    rt = _Runtime(LbSizes(services=1024, backends=4096), resized=frozenset({"lb_services",
                                                                           "lb_slots", "lb_vips"}))
    again = _table(t.snapshot(), rt)
    for name in ("lb_services", "lb_slots", "lb_vips"):
        assert set(rt.tables[name].entries) == set(old[name].entries), name
        assert [bytes(v) for _, v in sorted(rt.tables[name].entries.values(),
                                            key=lambda kv: bytes(kv[0]))] == \
            [bytes(v) for _, v in sorted(old[name].entries.values(), key=lambda kv: bytes(kv[0]))]
    assert again.slots_used == t.slots_used
    # not resized: nothing is written but the addresses (as before)
    rt2 = _Runtime()
    _table(t.snapshot(), rt2)
    assert not rt2.tables["lb_services"].entries and not rt2.tables["lb_slots"].entries


def test_sizes_are_compile_flags() -> None:
    assert LbSizes(16, 32).defines() == {"PCN_LB_SERVICES_MAX": 16, "PCN_LB_BACKENDS_MAX": 32}
    with pytest.raises(ValueError):
        LbSizes(0, 32)
    with pytest.raises(ValueError):
        LbSizes(16, 1 << 30)


def test_a_local_nodeport_needs_room_for_both_its_entries_before_either_is_written() -> None:
    """check_room() weighs several entries at once (a NodePort with a Local
    policy sets an internal and an external one): with room for one only,
    it refuses and the caller writes neither."""
    rt = _Runtime(LbSizes(services=3, backends=64))
    t = _table(rt=rt)
    t.set("10.96.0.1", 80, "tcp", [Backend("10.244.1.2", 8080)])
    t.set("10.96.0.2", 80, "tcp", [Backend("10.244.1.2", 8080)])
    both = [("192.168.1.10", 30080, "tcp", False, [Backend("10.244.1.2", 8080)]),
            ("192.168.1.10", 30080, "tcp", True, [Backend("10.244.1.2", 8080)])]
    with pytest.raises(TableFullError, match="has 1 of 3 entries left, it needs 2"):
        t.check_room(both)
    t.check_room(both[:1])  # one fits
    # updates of entries already in need no room
    t.check_room([("10.96.0.1", 80, "tcp", False, [Backend("10.244.1.3", 8080)])])
    assert len(rt.tables["lb_services"].entries) == 2
