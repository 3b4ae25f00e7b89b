"""The node's service table (cubes/lbrp.ServiceTable) without a kernel: its
maps stand in as dicts, which is all the table asks of them."""

from __future__ import annotations

from dataclasses import asdict

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
