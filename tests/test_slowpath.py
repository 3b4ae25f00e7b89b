"""The ARP resolver of the slow path, with a stand-in for the injection device
and the router's neighbour table (no kernel needed): packets waiting for a
next hop leave in the order they came."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.slowpath import ArpResolver

CUBE, IN_PORT, OUT_PORT = 7, 3, 4
NEXT_HOP = maps.ip_be("10.244.1.12")


@dataclass
class FakePort:
    mac: str = "0a:58:00:00:00:04"
    ip: str = "10.244.1.1"
    cube: str = "r0"
    name: str = "pods"


@dataclass
class FakeRuntime:
    ports: dict[int, FakePort] = field(default_factory=lambda: {OUT_PORT: FakePort()})


class FakeNeigh(dict[tuple[int, int], bytes]):
    """The router's neighbour table, keyed as the resolver asks for it."""

    def __getitem__(self, key: Any) -> bytes:
        return super().__getitem__((key.cube, key.ip))


@dataclass
class FakeSlowPath:
    """Records what is injected; the ARP answer is learned at once (what a
    neighbour on a veth does), before the resolver hears of it."""

    neigh: FakeNeigh
    injected: list[bytes] = field(default_factory=list)
    handlers: dict[int, Any] = field(default_factory=dict)

    def on(self, reason: int, handler: Any) -> None:
        self.handlers[int(reason)] = handler

    def every_tick(self, fn: Any) -> None:
        pass

    def inject(self, frame: bytes, port_id: int, action: int) -> None:
        if frame[12:14] == b"\x08\x06":
            self.neigh[(CUBE, NEXT_HOP)] = b"learned"
            self.injected.append(b"arp")
        else:
            self.injected.append(frame)


def miss(pkt: bytes) -> maps.SlowMsg:
    return maps.SlowMsg(maps.SlowReason.ARP_MISS, CUBE, IN_PORT, OUT_PORT, NEXT_HOP, len(pkt))


def test_packets_waiting_for_a_next_hop_leave_in_their_order() -> None:
    """Three fragments of one datagram miss the next hop in one burst; the
    answer is learned after the first: the later two must not overtake it
    (a cube needing the first fragment first would drop them)."""
    neigh = FakeNeigh()
    slow = FakeSlowPath(neigh)
    resolver = ArpResolver(FakeRuntime(), slow, neigh)  # type: ignore[arg-type]
    frags = [bytes([n]) * 60 for n in (1, 2, 3)]  # not IPv4: injected exactly as held
    on_miss = slow.handlers[maps.SlowReason.ARP_MISS]
    for f in frags:
        on_miss(miss(f), f)
    slow.handlers[maps.SlowReason.NEIGH_LEARNED](
        maps.SlowMsg(maps.SlowReason.NEIGH_LEARNED, CUBE, OUT_PORT, OUT_PORT, NEXT_HOP, 0), b"")
    assert slow.injected == [b"arp", *frags]
    assert resolver.requests_sent == 1
    # once nothing waits, a miss (the event raced the learning) goes at once
    on_miss(miss(b"\x04" * 60), b"\x04" * 60)
    assert slow.injected[-1] == b"\x04" * 60
