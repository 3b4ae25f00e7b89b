"""bench.plot: every plot is drawn from a results file's entries (PNG out),
and refuses to draw one without its data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import plot
from bench.results import Result

PNG = b"\x89PNG\r\n\x1a\n"


def _results() -> list[Result]:
    out = []
    for scenario, variants in (("pod-to-pod-same-node", ("pcn", "veth", "linux-bridge")),
                               ("pod-to-pod-cross-node", ("pcn", "veth", "node-to-node")),
                               ("pod-to-service", ("pcn", "kube-proxy-nftables",
                                                   "kube-proxy-iptables"))):
        for k, v in enumerate(variants):
            out.append(Result(scenario, v, "throughput", 10.0 + k, "Gbit/s"))
            out.append(Result(scenario, v, "tcp-rr", 20000.0 + 100 * k, "trans/s"))
    for v, gbps, us in (("pcn", 13.0, 65), ("fw-0", 13.5, 66), ("fw-100", 13.7, 67),
                        ("fw-1000", 13.8, 67), ("fw-10000", 13.9, 69)):
        out.append(Result("firewall-scale", v, "throughput", gbps, "Gbit/s"))
        out.append(Result("firewall-scale", v, "latency", us, "us"))
    for n in (10, 1000):
        for v in ("pcn", "kube-proxy-nftables"):
            out.append(Result("service-scale", v, f"latency@{n}", 70.0, "us"))
            out.append(Result("service-scale", v, f"install@{n}", 100.0, "ms"))
    return out


def test_write_all_from_a_results_file(tmp_path: Path) -> None:
    src = tmp_path / "latest.json"
    src.write_text(json.dumps({"results": [r.to_json() for r in _results()]}))
    loaded = plot.load(src)
    assert len(loaded) == len(_results()) and loaded[0].extra == {}
    written = plot.write_all(loaded, tmp_path / "out")
    assert sorted(p.name for p in written) == ["firewall-scale.png", "service-scale.png",
                                               "throughput.png"]
    for p in written:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000
    assert plot.main([str(src), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "throughput.png").exists()


def test_plots_need_their_data(tmp_path: Path) -> None:
    only_fw = [r for r in _results() if r.scenario == "firewall-scale"]
    with pytest.raises(ValueError):
        plot.throughput_png(only_fw, tmp_path / "t.png")
    with pytest.raises(ValueError):
        plot.firewall_scale_png([], tmp_path / "f.png")
    assert [p.name for p in plot.write_all(only_fw, tmp_path)] == ["firewall-scale.png"]
    # throughput without any tcp-rr: the right panel says so, the plot is still drawn
    tp_only = [r for r in _results() if r.metric == "throughput"]
    assert plot.throughput_png(tp_only, tmp_path / "tp.png").exists()


def test_service_scale_with_100000_and_a_skipped_reference(tmp_path: Path) -> None:
    """The fourth level (100 000) is drawn like the others; a reference not
    run there (a skipped@ entry, no point) is noted, not an error, and the
    acceptance line says it was not run."""
    from bench.results import acceptance

    res: list[Result] = []
    for n in (10, 1000, 10000, 100000):
        res.append(Result("service-scale", "pcn", f"latency@{n}", 70.0 + n / 100000, "us"))
        res.append(Result("service-scale", "pcn", f"install@{n}", n / 10, "ms"))
        res.append(Result("service-scale", "kube-proxy-nftables", f"latency@{n}", 80.0, "us"))
        res.append(Result("service-scale", "kube-proxy-nftables", f"install@{n}", n, "ms"))
        if n < 100000:
            res.append(Result("service-scale", "kube-proxy-iptables", f"latency@{n}", 90, "us"))
        else:
            res.append(Result("service-scale", "kube-proxy-iptables", f"skipped@{n}", 0, "",
                              {"reason": "not run with more than 10000 services"}))
    out = plot.service_scale_png(res, tmp_path / "s.png")
    assert out.read_bytes()[:8] == PNG
    line = next(x for x in acceptance(res) if "service latency" in x)
    assert "with 100000 services 71 us vs 70 us with 10" in line
    assert "kube-proxy-nftables 80 -> 80 us" in line
    assert "kube-proxy-iptables not run at 100000" in line
