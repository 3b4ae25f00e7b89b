"""The service-scale picture: request latency against the number of services."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .results import Result

_METRIC = re.compile(r"^latency(-p99)?@(\d+)$")
# one colour per variant, pcn's in blues and the references in the others, so
# that no two bars of one picture share a colour (matplotlib's default cycle
# would repeat pcn's blue for the eleventh variant)
COLORS = {"pcn": "tab:blue", "pcn-socklb": "#6baed6", "pcn-direct": "#08306b",
          "kube-proxy-iptables": "tab:red", "kube-proxy-nftables": "tab:orange",
          "linux-bridge": "tab:green", "veth": "tab:gray", "veth-1500": "#c7c7c7",
          "node-to-node": "tab:purple", "vxlan-kernel": "tab:brown",
          "vxlan-kernel-pods": "#e7ba52", "direct-kernel-pods": "tab:pink"}
_SPARE = ("tab:olive", "tab:cyan", "#393b79", "#637939")


def service_scale_png(results: Sequence[Result], path: Path) -> Path:
    """Latency (median solid, p99 dashed) of every variant against the number
    of services installed, log x axis; written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    installs: dict[str, list[tuple[int, float]]] = {}
    skipped: list[tuple[str, int]] = []  # (variant, level) not run, services.py says why
    for r in results:
        if r.scenario != "service-scale":
            continue
        if r.metric.startswith("skipped@"):
            skipped.append((r.variant, int(r.metric.split("@")[1])))
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
    levels = sorted({x for points in [*series.values(), *installs.values()] for x, _ in points})
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
    if skipped:  # a missing point says why, not nothing
        note = "; ".join(f"{v} not run at {x:,}".replace(",", " ")
                         for v, x in sorted(skipped, key=lambda s: (s[1], s[0])))
        ax2.annotate(f"{note} (see the reason of its skipped@N result)",
                     (0.5, -0.2), xycoords="axes fraction", ha="center", fontsize=7, wrap=True)
    ax2.grid(True, which="both", alpha=0.3)
    if installs:
        ax2.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PATHS = ("pod-to-pod-same-node", "pod-to-pod-cross-node", "pod-to-service")
FIREWALL_LEVELS = ("fw-0", "fw-100", "fw-1000", "fw-10000")


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_png(results: Sequence[Result], path: Path) -> Path:
    """Bulk throughput (Gbit/s, left) and TCP_RR rate (transactions/s, right)
    of every variant of each path scenario, grouped bars with their values;
    written to `path` (PNG). Raises ValueError without any path result."""
    plt = _pyplot()
    by: dict[tuple[str, str], dict[str, float]] = {}
    for r in results:
        if r.scenario in PATHS and r.metric in ("throughput", "tcp-rr"):
            by.setdefault((r.scenario, r.metric), {})[r.variant] = r.value
    if not by:
        raise ValueError("no throughput or tcp-rr results of the path scenarios to plot")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    # a variant keeps its colour in both pictures, and one legend under them
    # both leaves every bar visible
    spare = iter(_SPARE)
    colour = {v: COLORS.get(v) or next(spare, None)
              for v in sorted({v for bars in by.values() for v in bars})}
    handles: dict[str, object] = {}
    for ax, metric, unit in ((axes[0], "throughput", "Gbit/s"),
                             (axes[1], "tcp-rr", "transactions/s")):
        scenarios = [s for s in PATHS if (s, metric) in by]
        variants = sorted({v for s in scenarios for v in by[(s, metric)]},
                          key=lambda v: (v != "pcn", v))
        if not scenarios:
            ax.text(0.5, 0.5, f"no {metric} results", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        # each scenario's own variants side by side, centred on its tick
        width = 0.8 / max(len(by[(s, metric)]) for s in scenarios)
        pos: dict[tuple[int, str], float] = {}
        for i, s in enumerate(scenarios):
            present = [v for v in variants if v in by[(s, metric)]]
            for j, v in enumerate(present):
                pos[(i, v)] = i + (j - (len(present) - 1) / 2) * width
        for v in variants:
            pts = [(pos[(i, v)], by[(s, metric)][v]) for i, s in enumerate(scenarios)
                   if (i, v) in pos]
            xs, ys = [x for x, _ in pts], [y for _, y in pts]
            bars = ax.bar(xs, ys, width, label=v, color=colour[v])
            handles.setdefault(v, bars)
            ax.bar_label(bars, [f"{y:.1f}" if metric == "throughput" else f"{y / 1000:.1f}k"
                                for y in ys], fontsize=7)
        ax.set_xticks(range(len(scenarios)),
                      [s.replace("pod-to-", "→ ") for s in scenarios], fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title("Bulk TCP (iperf3)" if metric == "throughput"
                     else "TCP request/response on one connection (sockperf ping-pong)")
        ax.grid(True, axis="y", alpha=0.3)
    order = sorted(handles, key=lambda v: (not v.startswith("pcn"), v))
    fig.legend([handles[v] for v in order], order, loc="lower center",
               ncol=min(6, len(order)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def firewall_scale_png(results: Sequence[Result], path: Path) -> Path:
    """Throughput (bars) and new-connection request latency p50 (line) with
    0 to 10 000 firewall rules in force; written to `path` (PNG). Raises
    ValueError without firewall-scale results."""
    plt = _pyplot()
    tp = {r.variant: r.value for r in results
          if r.scenario == "firewall-scale" and r.metric == "throughput"}
    lat = {r.variant: r.value for r in results
           if r.scenario == "firewall-scale" and r.metric == "latency"}
    levels = [v for v in FIREWALL_LEVELS if v in tp]
    if not levels:
        raise ValueError("no firewall-scale results to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar(range(len(levels)), [tp[v] for v in levels], color="tab:blue",
                  label="throughput")
    ax.bar_label(bars, [f"{tp[v]:.2f}" for v in levels], fontsize=8, label_type="center",
                 color="white")
    ax.set_xticks(range(len(levels)), [v.removeprefix("fw-") for v in levels])
    ax.set_xlabel("firewall rules in force (the matching allow rule last)")
    ax.set_ylabel("pod-to-pod TCP, Gbit/s")
    if "pcn" in tp:
        ax.axhline(tp["pcn"], color="gray", linestyle=":", label="no firewall")
    if lat:
        ax2 = ax.twinx()
        ax2.plot([i for i, v in enumerate(levels) if v in lat],
                 [lat[v] for v in levels if v in lat], color="tab:red", marker="o",
                 label="request p50")
        ax2.set_ylabel("new connection + request p50, µs")
        ax2.set_ylim(0, max(lat.values()) * 1.15)  # the line near the top, off the bar labels
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Firewall cube at scale")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load(path: Path) -> list[Result]:
    """The results of a bench JSON file (bench/results/latest.json's shape)."""
    import json

    doc = json.loads(path.read_text())
    out = []
    for e in doc.get("results", []):
        e = dict(e)
        out.append(Result(e.pop("scenario"), e.pop("variant"), e.pop("metric"),
                          float(e.pop("value")), e.pop("unit"), e))
    return out


def write_all(results: Sequence[Result], directory: Path) -> list[Path]:
    """Every plot the results allow (service-scale, firewall-scale,
    throughput), into `directory`; the files written."""
    out = []
    for name, fn in (("service-scale.png", service_scale_png),
                     ("firewall-scale.png", firewall_scale_png),
                     ("throughput.png", throughput_png)):
        try:
            out.append(fn(results, directory / name))
        except ValueError:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.plot [RESULTS.json [DIR]]`: the plots of a results
    file (default bench/results/latest.json, next to it)."""
    import sys

    from .results import DEFAULT_OUTPUT

    args = sys.argv[1:] if argv is None else argv
    src = Path(args[0]) if args else DEFAULT_OUTPUT
    directory = Path(args[1]) if len(args) > 1 else src.parent
    for p in write_all(load(src), directory):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
