"""bench.controlplane's pieces that need no kernel and no API server: the
profile summary and the acceptance line of the control-plane scenarios."""

from __future__ import annotations

from pathlib import Path

from bench.controlplane import top
from bench.results import Result, acceptance


def test_top_counts_own_and_total_samples(tmp_path: Path) -> None:
    """py-spy raw: one collapsed stack per line, outermost frame first, then
    the count; own time is the innermost frame's, total anywhere in the
    stack (once per stack, however deep the recursion)."""
    f = tmp_path / "agent.ep"
    f.write_text("run (agent.py:1);reconcile (agent.py:2);plan (reconcile.py:3) 6\n"
                 "run (agent.py:1);reconcile (agent.py:2) 2\n"
                 "run (agent.py:1);walk (x.py:1);walk (x.py:1) 2\n"
                 "garbage\n")
    out = top(f, 3).splitlines()
    assert out[0].endswith("10 samples")
    own = out[out.index("-- by own samples") + 1:out.index("-- by total samples")]
    assert own == [" 60.0%  plan (reconcile.py:3)", " 20.0%  reconcile (agent.py:2)",
                   " 20.0%  walk (x.py:1)"]
    total = out[out.index("-- by total samples") + 1:]
    assert total[0] == "100.0%  run (agent.py:1)"
    assert total[1] == " 80.0%  reconcile (agent.py:2)"
    empty = tmp_path / "empty"
    empty.write_text("")
    assert top(empty) == f"{empty}: no samples"


def test_acceptance_names_the_scale() -> None:
    common = {"services": 10000, "endpoints": 50000}
    lines = acceptance([
        Result("endpoints-to-dataplane", "pcn", "latency", 20.0, "ms", dict(common)),
        Result("endpoints-to-dataplane", "pcn", "latency-p99", 60.0, "ms", dict(common)),
        Result("agent-cold-start", "pcn", "time", 9.0, "s", {"services": 10000})])
    ep = next(x for x in lines if "EndpointSlice" in x)
    assert "with 10000 Services / 50000 endpoints" in ep and "p99 60.0 ms" in ep
    assert "target p99 < 50 ms" in ep and ep.endswith("FAIL")
    cold = next(x for x in lines if "cold start" in x)
    assert "10000 Services 9.0 s" in cold
