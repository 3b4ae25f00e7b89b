"""Benchmark results: the JSON file (merged across runs) and the printed table."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"
REFERENCE_VARIANT = "linux-bridge"  # the acceptance compares pcn with it
LIMIT_VARIANT = "veth"  # the cheapest path between two namespaces
THROUGHPUT = "throughput"
SAME_NODE_TARGET = 0.80  # pcn same-node throughput / linux-bridge's (issue acceptance)
POD_ADD_TARGET_MS = 100.0  # median pod-add latency (issue acceptance)


@dataclass
class Result:
    scenario: str
    variant: str
    metric: str
    value: float
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "variant": self.variant, "metric": self.metric,
                "value": round(self.value, 3), "unit": self.unit, **self.extra}


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def machine_metadata() -> dict[str, Any]:
    return {"date": now_iso(), "kernel": platform.release(), "cpu_count": os.cpu_count()}


def ratio_to_reference(results: Sequence[Result], r: Result,
                       reference: str = REFERENCE_VARIANT) -> float | None:
    """Throughput of `r` over the `reference` variant of the same scenario (same run)."""
    if r.metric != THROUGHPUT:
        return None
    for ref in results:
        if (ref.scenario, ref.variant, ref.metric) == (r.scenario, reference, r.metric):
            return r.value / ref.value if ref.value else None
    return None


def merge_write(path: Path, results: Sequence[Result], scenarios: Iterable[str],
                metadata: dict[str, Any]) -> dict[str, Any]:
    """Replace the entries of `scenarios` in `path` by `results`, keep the others."""
    measured = set(scenarios)
    kept: list[dict[str, Any]] = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
            kept = [e for e in old.get("results", []) if e.get("scenario") not in measured]
        except (json.JSONDecodeError, AttributeError) as exc:
            raise RuntimeError(f"{path} is not a results file ({exc}); move it away") from None
    doc = {**metadata, "results": kept + [r.to_json() for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latest-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return doc


def table(results: Sequence[Result]) -> str:
    header = ("scenario", "variant", "metric", "value", "unit", "vs linux-bridge", "vs veth")
    rows = [header]
    for r in results:
        ratios = [ratio_to_reference(results, r, ref) for ref in (REFERENCE_VARIANT, LIMIT_VARIANT)]
        rows.append((r.scenario, r.variant, r.metric, f"{r.value:.2f}", r.unit,
                     *(f"{x * 100:.0f}%" if x is not None else "" for x in ratios)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in (3, 5, 6) else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _find(results: Sequence[Result], scenario: str, variant: str, metric: str) -> Result | None:
    return next((r for r in results if (r.scenario, r.variant, r.metric)
                 == (scenario, variant, metric)), None)


def acceptance(results: Sequence[Result]) -> list[str]:
    """The issue's acceptance targets, for what this run measured."""
    lines = []
    pcn = _find(results, "pod-to-pod-same-node", "pcn", THROUGHPUT)
    if pcn is not None:
        ratio = ratio_to_reference(results, pcn)
        if ratio is not None:
            lines.append(f"acceptance: pcn same-node throughput {ratio * 100:.0f}% of "
                         f"linux-bridge (target >= {SAME_NODE_TARGET * 100:.0f}%): "
                         f"{'PASS' if ratio >= SAME_NODE_TARGET else 'FAIL'}")
    add = _find(results, "pod-add", "pcn", "latency")
    if add is not None:
        lines.append(f"acceptance: pcn pod-add median {add.value:.1f} ms "
                     f"(target < {POD_ADD_TARGET_MS:.0f} ms): "
                     f"{'PASS' if add.value < POD_ADD_TARGET_MS else 'FAIL'}")
    return lines
