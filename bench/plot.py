"""The service-scale picture: request latency against the number of services."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .results import Result

_METRIC = re.compile(r"^latency(-p99)?@(\d+)$")
COLORS = {"pcn": "tab:blue", "kube-proxy-iptables": "tab:red",
          "kube-proxy-nftables": "tab:orange"}


def service_scale_png(results: Sequence[Result], path: Path) -> Path:
    """Latency (median solid, p99 dashed) of every variant against the number
    of services installed, log x axis; written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    installs: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if r.scenario != "service-scale":
            continue
        if r.metric.startswith("install@"):
            secs = r.value / 1000 if r.unit == "ms" else r.value
            installs.setdefault(r.variant, []).append((int(r.metric.split("@")[1]), secs))
            continue
        m = _METRIC.match(r.metric)
        if m:
            stat = "p99" if m.group(1) else "median"
            series.setdefault((r.variant, stat), []).append((int(m.group(2)), r.value))
    if not series:
        raise ValueError("no service-scale latency results to plot")

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6),
                                  gridspec_kw={"width_ratios": [3, 2]})
    for (variant, stat), points in sorted(series.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", linestyle="-" if stat == "median" else "--",
                color=COLORS.get(variant), label=f"{variant} {stat}")
        if stat == "median":  # pcn's values below its points, the others' above
            dy = -13 if variant == "pcn" else 7
            for x, y in points:
                ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, dy),
                            ha="center", fontsize=8, color=COLORS.get(variant))
    levels = sorted({x for points in series.values() for x, _ in points})
    ax.set_xscale("log")
    ax.set_xticks(levels, [f"{x:,}".replace(",", " ") for x in levels])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("services installed (log scale)")
    ax.set_ylabel("request latency, µs")
    ax.set_title("New connection + request/response to the last service installed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)

    for variant, points in sorted(installs.items()):
        points.sort()
        ax2.plot([p[0] for p in points], [p[1] for p in points], marker="s",
                 color=COLORS.get(variant), label=variant)
    ax2.set_xscale("log")
    ax2.set_xticks(levels, [f"{x:,}".replace(",", " ") for x in levels])
    ax2.minorticks_off()
    ax2.set_yscale("log")
    ax2.margins(x=0.1, y=0.12)  # room for the labels above the points
    ax2.set_xlabel("services installed (log scale)")
    ax2.set_ylabel("install time, s (log scale)")
    for variant, points in installs.items():
        for x, y in points:
            ax2.annotate(f"{y * 1000:.0f} ms" if y < 1 else f"{y:.2f} s", (x, y),
                         textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8,
                         color=COLORS.get(variant))
    ax2.set_title("Installing all services")
    ax2.grid(True, which="both", alpha=0.3)
    if installs:
        ax2.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
