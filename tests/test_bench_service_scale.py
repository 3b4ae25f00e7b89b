"""bench.services' service-scale pieces that need no network: the backends
of each service and which kube-proxy modes run at a level."""

from __future__ import annotations

import ipaddress
from typing import Any

from bench import services
from bench.services import (
    BACKENDS_PER_SERVICE,
    KP_MAX_SERVICES,
    _kube_proxy_cold_start,
    _scale_backends,
)


def test_every_service_but_the_measured_one_has_five_unused_backends() -> None:
    net = ipaddress.IPv4Network("10.245.0.0/24")
    n = 100_000
    for i in (0, 1, 49, 50, 99_998):
        b = _scale_backends(i, n, net, ["10.245.0.2", "10.245.0.3"], 8083)
        assert len(b) == len(set(b)) == BACKENDS_PER_SERVICE == 5
        assert all(ipaddress.IPv4Address(ip) in net and int(ip.split(".")[3]) >= 200
                   for ip, _ in b)
    assert _scale_backends(n - 1, n, net, ["10.245.0.2", "10.245.0.3"], 8083) == \
        (("10.245.0.2", 8083), ("10.245.0.3", 8083))


class _Proxy:
    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.started = self.cleaned = False

    def start(self) -> None:
        self.started = True

    def wait_programmed(self, ports: Any, with_endpoints: Any, timeout: float) -> float:
        if self.seconds is None or self.seconds > timeout:
            raise RuntimeError(f"kube-proxy: after {timeout:.0f} s still missing 3")
        return self.seconds

    def cleanup(self) -> None:
        self.cleaned = True


class _Ctx:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def progress(self, msg: str) -> None:
        self.lines.append(msg)


class _Nodes:
    def __init__(self, proxies: dict[str, _Proxy]) -> None:
        self.proxies = proxies


def test_kube_proxy_modes_past_their_level_or_too_slow_are_skipped_with_a_reason() -> None:
    assert KP_MAX_SERVICES == {"iptables": 10_000, "nftables": 100_000}
    ctx = _Ctx()
    ipt, nft = _Proxy(1.0), _Proxy(2.0)
    ready, skipped = _kube_proxy_cold_start(ctx, _Nodes({"iptables": ipt, "nftables": nft}),
                                            10_000, ["p"])  # type: ignore[arg-type]
    assert ready == {"iptables": 1.0, "nftables": 2.0} and skipped == {}

    ipt, nft = _Proxy(1.0), _Proxy(services.KP_COLD_START_TIMEOUT_S + 1)
    ready, skipped = _kube_proxy_cold_start(ctx, _Nodes({"iptables": ipt, "nftables": nft}),
                                            100_000, ["p"])  # type: ignore[arg-type]
    assert ready == {} and not ipt.started and nft.started and nft.cleaned
    assert "more than 10000 services" in skipped["iptables"]
    assert skipped["nftables"].startswith("cold start not done within 300 s")
    assert sum("skipped" in line for line in ctx.lines) == 2


def test_scale_levels_go_up_to_the_default_service_table() -> None:
    import pytest

    from bench.run import parse_args
    from pcn_agent.dataplane.cubes.lbrp import LbSizes

    assert parse_args(["--only", "service-scale"]).scale_levels == (10, 1000, 10000, 100000)
    assert parse_args(["--scale", f"10,{LbSizes().services}"]).scale_levels[-1] == 131072
    with pytest.raises(SystemExit):
        parse_args(["--scale", f"10,{LbSizes().services + 1}"])


def test_a_level_whose_api_objects_would_take_too_long_runs_without_kube_proxy() -> None:
    ctx = _Ctx()
    ipt, nft = _Proxy(1.0), _Proxy(2.0)
    why = "creating 90000 Services + EndpointSlices would take ~94 min"
    ready, skipped = _kube_proxy_cold_start(ctx, _Nodes({"iptables": ipt, "nftables": nft}),
                                            100_000, ["p"], why)  # type: ignore[arg-type]
    assert ready == {} and skipped == {"iptables": why, "nftables": why}
    assert not ipt.started and not nft.started
