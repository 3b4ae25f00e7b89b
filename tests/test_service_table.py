"""The node's service table (cubes/lbrp.ServiceTable) without a kernel: its
maps stand in as dicts, which is all the table asks of them."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pcn_agent.dataplane.cubes.lbrp import MAX_SERVICES, Backend, ServiceTable


class _Map:
    """A BPF table as BCC shows it: ctypes keys and values (unhashable)."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[object, object]] = {}

    def __setitem__(self, key: object, value: object) -> None:
        self.entries[bytes(key)] = (key, value)  # type: ignore[call-overload]

    def __delitem__(self, key: object) -> None:
        del self.entries[bytes(key)]  # type: ignore[call-overload]

    def items(self) -> list[tuple[object, object]]:
        return list(self.entries.values())

    def keys(self) -> list[object]:
        return [k for k, _ in self.entries.values()]


class _Runtime:
    def __init__(self) -> None:
        self.tables: dict[str, _Map] = {}

    def table(self, name: str, cube_type: str) -> _Map:
        return self.tables.setdefault(name, _Map())


def _table(state: dict | None = None) -> ServiceTable:
    return ServiceTable(_Runtime(), "lbrp", state)  # type: ignore[arg-type]


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
    assert again._free_ids == [i for i in range(MAX_SERVICES, 0, -1) if i not in used]
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
