"""Printing: kubectl-style tables, YAML and JSON, and human units."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from .agents import parse_time

FORMATS = ("table", "wide", "yaml", "json")
NONE = "<none>"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, three spaces apart, headers in
    capitals, like `kubectl get`."""
    cells = [[str(h).upper() for h in headers]] + [
        [NONE if v is None or v == "" else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    return "\n".join(lines)


class _Dumper(yaml.SafeDumper):
    """Block style, long strings unfolded, keys in the order given."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=1000, allow_unicode=True)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


def documents(objs: Sequence[Mapping[str, Any]], fmt: str) -> str:
    """Objects as YAML documents separated by ---, or a JSON List: both are
    what `kubectl apply -f` (and Argo CD) take."""
    if fmt == "json":
        return to_json({"apiVersion": "v1", "kind": "List", "items": list(objs)})
    return "---\n".join(to_yaml(dict(o)) for o in objs)


def data(value: Any, fmt: str) -> str:
    return to_json(value) if fmt == "json" else to_yaml(value).rstrip("\n")


def human_duration(seconds: float | None) -> str:
    """kubectl's compact ages: 42s, 5m, 3h, 2d."""
    if seconds is None:
        return "unknown"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def age(timestamp: str | None, now: float | None = None) -> str:
    at = parse_time(timestamp)
    if at is None:
        return NONE
    return human_duration(max(0.0, (time.time() if now is None else now) - at))


def human_bytes(n: int | None) -> str:
    if n is None:
        return NONE
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def ready(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """The Ready condition's status, reason and message."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return str(c.get("status", "")), str(c.get("reason", "")), str(c.get("message", ""))
    return "Unknown", "", ""
