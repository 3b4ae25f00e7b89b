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
REFERENCE_VARIANT = "linux-bridge"
THROUGHPUT = "throughput"


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


def ratio_to_reference(results: Sequence[Result], r: Result) -> float | None:
    """Throughput of `r` over the linux-bridge variant of the same scenario (same run)."""
    if r.metric != THROUGHPUT:
        return None
    for ref in results:
        if (ref.scenario, ref.variant, ref.metric) == (r.scenario, REFERENCE_VARIANT, r.metric):
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
    header = ("scenario", "variant", "metric", "value", "unit", "vs linux-bridge")
    rows = [header]
    for r in results:
        ratio = ratio_to_reference(results, r)
        rows.append((r.scenario, r.variant, r.metric, f"{r.value:.2f}", r.unit,
                     f"{ratio * 100:.0f}%" if ratio is not None else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in (3, 5) else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
