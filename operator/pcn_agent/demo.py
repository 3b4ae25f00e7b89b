"""pcn demo: two nodes with two pods each, wired by pcn's eBPF data plane.

Builds the lab in network namespaces (nothing in the root namespace), checks
pod-to-pod connectivity on one node and across nodes over VXLAN, prints a
table with one row per check, removes everything and exits non-zero if any
check failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from . import checks
from .topology import Lab

NO_ROUTE_IP = "10.99.0.1"


def _progress(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def run_checks(lab: Lab) -> list[checks.CheckResult]:
    p = lab.pods
    n1 = lab.node(1)
    results = [
        checks.ping(lab, "n1p1", n1.cfg.gateway, "gateway (router)"),
        checks.ping(lab, "n1p1", p["n1p2"].ip, "n1p2"),
        checks.tcp(lab, "n1p1", p["n1p2"].ip, "n1p2"),
        checks.ping(lab, "n1p1", p["n2p1"].ip, "n2p1"),
        checks.tcp(lab, "n1p1", p["n2p1"].ip, "n2p1"),
        checks.udp(lab, "n1p1", p["n2p1"].ip, "n2p1"),
        checks.tcp(lab, "n2p2", p["n1p2"].ip, "n1p2", nbytes=1_000_000),
    ]
    before = n1.rt.cube_drops("r0").get("no_route", 0)
    blocked = checks.ping(lab, "n1p2", NO_ROUTE_IP, f"{NO_ROUTE_IP} (no route)", count=2,
                          expect_blocked=True)
    after = n1.rt.cube_drops("r0").get("no_route", 0)
    blocked.detail += f", router no_route drops {before} -> {after}"
    blocked.side_condition = after >= before + 2
    results.append(blocked)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pcn-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log what the data plane does")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    start = time.monotonic()
    lab = Lab(nodes_count=2, pods_per_node=2)
    _progress(f"building two nodes with two pods each (run {lab.run_id}); "
              "compiling the cubes takes a few seconds")
    try:
        lab.build()
        _progress(f"lab up in {time.monotonic() - start:.1f} s; running checks")
        with checks.servers(lab):
            results = run_checks(lab)
    finally:
        _progress("tearing down")
        lab.close()
    left = lab.leftovers()
    print(checks.render(results))
    failed = [r for r in results if not r.passed]
    if left:
        print(f"\nteardown left objects behind: {left}", file=sys.stderr)
        return 1
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed, nothing left behind "
          f"({time.monotonic() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
