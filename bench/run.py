"""`make bench`: pcn against reference topologies (throughput, service latency and
scale), the control plane's speed (pod add, EndpointSlice to data plane,
agent cold start, CNI ADD) and network policy at scale (reconcile per change,
a pod's policy wired, throughput under 100 rules).

    .venv/bin/python -m bench.run [--only SCENARIO[,SCENARIO]] [--duration S] [--runs N]
                                  [--requests N] [--scale N,N,...] [--output FILE]
                                  [--pin | --no-pin]

`--only policy-reconcile,policy-pod-add,policy-throughput` (`make bench-policy`)
runs just the network policy scenarios; `--only firewall-scale` the firewall
cube with 0 to 10 000 rules; `--only cube-cost` each program's ns/packet
(BPF_PROG_TEST_RUN) and size (bpf_prog_info); `--only policer-rate` iperf3
through policers at 10M, 100M and 1G against the configured rate (bench.policer).
The services scenarios (pod-to-service, service-scale) compare with the upstream kube-proxy in
iptables and nftables modes and need `make k8s`'s binaries; every path
compared gets a TCP_RR rate (sockperf) next to its iperf3 throughput.

Progress goes to stderr, the table to stdout; results are merged into
bench/results/latest.json (entries of the scenarios measured now are replaced,
the others kept) and the plots redrawn next to it (bench.plot). Everything
is built in network namespaces named after this run (`pcnb-<id>` for the
references, `pcnt-<id>` for pcn labs) and removed at the end, also on Ctrl-C;
the run fails if any of them is left.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from pcn_agent.dataplane import bpffs
from pcn_agent.dataplane.cubes.lbrp import LbSizes
from pcn_agent.dataplane.runtime import STATE_ROOT

from . import (
    controlplane,
    cubecost,
    firewall,
    iperf,
    netns,
    policer,
    policy,
    results,
    scenarios,
    services,
)
from .scenarios import Context

SCENARIOS = {**scenarios.SCENARIOS, **services.SCENARIOS, **controlplane.SCENARIOS,
             **policy.SCENARIOS, **firewall.SCENARIOS, **cubecost.SCENARIOS,
             **policer.SCENARIOS}

log = logging.getLogger("bench")

# Not pinned by default: on the 2-vCPU VM pinning the client to CPU 0 and the
# server to CPU 1 halved throughput and made runs less repeatable (coefficient of
# variation 2-20 % against 6-12 %), the scheduler's own placement did better.
PINNED = iperf.Pinning(client=0, server=1)
BUSY_WARN_PCT = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SCENARIOS),
                   help=f"comma-separated scenarios (default: all of {', '.join(SCENARIOS)})")
    p.add_argument("--duration", type=float, default=5.0,
                   help="seconds per iperf3 run, after a 1 s warm-up not counted (default 5)")
    p.add_argument("--runs", type=int, default=3, help="iperf3 runs per variant (default 3)")
    p.add_argument("--pod-adds", type=int, default=20,
                   help="pods added in the pod-add scenario (default 20)")
    p.add_argument("--requests", type=int, default=2000,
                   help="requests per variant (and per level) in the service latency scenarios "
                        "(default 2000)")
    p.add_argument("--scale", default="10,1000,10000,100000",
                   help="numbers of services installed in service-scale "
                        "(default 10,1000,10000,100000)")
    p.add_argument("--endpoint-changes", type=int, default=100,
                   help="EndpointSlice changes timed in endpoints-to-dataplane (default 100)")
    p.add_argument("--endpoint-services", type=int, default=10000,
                   help="Services (with an EndpointSlice each) in the API in "
                        "endpoints-to-dataplane (default 10000)")
    p.add_argument("--endpoints-per-service", type=int, default=5,
                   help="endpoints of each of those Services, and of agent-cold-start's "
                        "(default 5)")
    p.add_argument("--cold-services", type=int, default=10000,
                   help="Services in the API before agent-cold-start's agent starts "
                        "(default 10000)")
    p.add_argument("--cni-adds", type=int, default=50,
                   help="pods added by pcn-cni in cni-add (default 50)")
    p.add_argument("--cni-parallel", type=int, default=30,
                   help="pods added by pcn-cni at once, on one node, in cni-add-parallel "
                        "(default 30)")
    p.add_argument("--policy-rounds", type=int, default=20,
                   help="rounds of five changes (pod label, namespace label, policy added, "
                        "policy removed, pod added elsewhere) timed in policy-reconcile "
                        "(default 20)")
    p.add_argument("--policy-pod-adds", type=int, default=50,
                   help="pods added to the node in policy-pod-add, 1 to 50 (default 50)")
    p.add_argument("--output", type=Path, default=results.DEFAULT_OUTPUT,
                   help=f"results file to merge into (default {results.DEFAULT_OUTPUT})")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False,
                   help="pin the iperf3 client to CPU 0 and the server to CPU 1 (default: off)")
    p.add_argument("-v", "--verbose", action="store_true", help="log the agent's INFO messages")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        p.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.duration <= 0 or args.runs < 1 or args.pod_adds < 1:
        p.error("--duration, --runs and --pod-adds must be positive")
    try:
        args.scale_levels = tuple(sorted({int(x) for x in args.scale.split(",") if x.strip()}))
    except ValueError:
        p.error(f"--scale takes numbers separated by commas, not {args.scale!r}")
    # the lab's nodes have the default service table (lbServiceMapMax)
    top = LbSizes().services
    if not args.scale_levels or min(args.scale_levels) < 1 or max(args.scale_levels) > top:
        p.error(f"--scale levels must be between 1 and {top} (the default lbServiceMapMax)")
    if min(args.requests, args.endpoint_changes, args.cold_services, args.cni_adds,
           args.cni_parallel, args.policy_rounds, args.endpoint_services,
           args.endpoints_per_service) < 1:
        p.error("--requests, --endpoint-changes, --endpoint-services, --endpoints-per-service, "
                "--cold-services, --cni-adds, --cni-parallel and --policy-rounds must be positive")
    if max(args.endpoint_services, args.cold_services) * args.endpoints_per_service > 61440:
        p.error("at most 61440 endpoints (Services x --endpoints-per-service): each has an "
                "address of its own in 10.244.16.0-10.244.255.255")
    if not 1 <= args.policy_pod_adds <= 50:
        p.error("--policy-pod-adds must be between 1 and 50 (the pods of one node)")
    if args.pin and (os.cpu_count() or 1) < 2:
        p.error("--pin needs two CPUs; use --no-pin")
    return args


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit("bench builds network namespaces and loads eBPF programs: run it as root")
    for tool in ("iperf3", "ip", "ss", "ping", "iptables-restore", "iptables-save", "nft",
                 "openssl", "sockperf", "tc"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run scripts/setup.sh (make setup)")
    for plugin in ("bridge", "host-local"):
        if not os.access(f"/usr/lib/cni/{plugin}", os.X_OK):
            sys.exit(f"/usr/lib/cni/{plugin} missing: install containernetworking-plugins")


_MAIN_PID = os.getpid()
_tearing_down = False


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (checked before and after the run:
    other work on the machine skews the results)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return 100.0 * (b1 - b0) / max(1, t1 - t0)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM: stop measuring and tear down; a second one waits for the teardown.

    pyroute2 forks short-lived children (to open sockets in a namespace) and
    stops them with SIGTERM: a child inherits this handler and must just exit,
    never unwind into the benchmark's own teardown."""
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    if _tearing_down:
        print("tearing down, please wait", file=sys.stderr, flush=True)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def _node_files(ctx: Context) -> list[tuple[Path, Path]]:
    """(pin directory, state file) of every node of this run's labs."""
    return [(lab.pin_root / lab.node_name(i), STATE_ROOT / f"{lab.node_name(i)}.json")
            for lab in ctx.labs for i in range(1, lab.nodes_count + 1)]


def _remove_stray_node_files(ctx: Context) -> None:
    """Pins (and state) of a node whose NodeDataplane.up() was interrupted: up()
    only cleans up after an Exception, so a Ctrl-C there leaves the node's pin
    directory, unknown to Lab.close(). The names belong to this run."""
    for pins, state in _node_files(ctx):
        if pins.exists():
            log.warning("removing pins left by an interrupted node start: %s", pins)
            bpffs.remove_instance(pins)
        if state.exists():
            log.warning("removing state left by an interrupted node start: %s", state)
            state.unlink()
        for f in state.parent.glob(f"{pins.name}.*.sqlite*") if state.parent.exists() else []:
            f.unlink(missing_ok=True)  # the service store (dataplane.servicestore)


def run_guarded(ctx: Context, prefix: str, body: Callable[[], None]
                ) -> tuple[BaseException | None, list[str]]:
    """Run `body` in `ctx.tmp` (created here), Ctrl-C and SIGTERM turned into a
    KeyboardInterrupt, then tear down everything of the run, also after a
    failure: its labs, namespaces, stray pins and state, `ctx.tmp`. Returns the
    failure (None: none) and what of the run is still there afterwards (namespaces
    named with `prefix` or a lab's prefix, pins, state files: should be [])."""
    global _MAIN_PID, _tearing_down
    failure: BaseException | None = None
    left: list[str] = []
    _MAIN_PID, _tearing_down = os.getpid(), False
    old_handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    tmp_created = False
    try:
        ctx.tmp.mkdir(mode=0o700)
        tmp_created = True
        body()
    except BaseException as exc:  # noqa: BLE001 - returned, after cleanup
        failure = exc
    finally:
        _tearing_down = True  # a second Ctrl-C must not cut the teardown short
        try:
            for lab in ctx.labs:
                try:
                    lab.close()  # no-op if its scenario closed it already
                except Exception as exc:  # noqa: BLE001
                    log.error("closing lab %s: %s", lab.prefix, exc)
            ctx.nss.remove_all()
            _remove_stray_node_files(ctx)
            if tmp_created:
                shutil.rmtree(ctx.tmp, ignore_errors=True)
            prefixes = [prefix, *(lab.prefix for lab in ctx.labs)]
            left = netns.existing(prefixes)
            for lab in ctx.labs:
                left += [x for x in lab.leftovers() if x not in left]
            left += [str(f) for pair in _node_files(ctx) for f in pair
                     if f.exists() and str(f) not in left]
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
    return failure, left


def setup_logging(verbose: bool) -> None:
    """Warnings on stderr (everything with `verbose`); pyroute2's chatter only
    when verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        logging.getLogger("pyroute2").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    preflight()

    prefix = netns.new_run_prefix()
    pinning = PINNED if args.pin else iperf.Pinning()
    busy = cpu_busy()
    ctx = Context(nss=netns.Namespaces(prefix), tmp=Path(tempfile.gettempdir()) / prefix,
                  duration=args.duration, runs=args.runs, pod_adds=args.pod_adds,
                  pinning=pinning, requests=args.requests, scale=args.scale_levels,
                  endpoint_changes=args.endpoint_changes, cold_services=args.cold_services,
                  endpoint_services=args.endpoint_services,
                  endpoints_per_service=args.endpoints_per_service,
                  cni_adds=args.cni_adds, cni_parallel=args.cni_parallel,
                  policy_rounds=args.policy_rounds,
                  policy_pod_adds=args.policy_pod_adds)
    ctx.progress(f"run {prefix}: {', '.join(args.scenarios)}; iperf3 {args.runs} x "
                 f"{args.duration:g} s per variant, {pinning.describe()}")
    if busy > BUSY_WARN_PCT:
        ctx.progress(f"WARNING: the CPUs were {busy:.0f}% busy before the run: other work "
                     "competes with the benchmark and its numbers will be low and noisy")
    measured: list[results.Result] = []
    done: list[str] = []

    def body() -> None:
        for scenario in args.scenarios:
            ctx.progress(f"== {scenario}")
            measured.extend(SCENARIOS[scenario](ctx))
            done.append(scenario)

    failure, left = run_guarded(ctx, prefix, body)
    prefixes = [prefix, *(lab.prefix for lab in ctx.labs)]

    if measured:
        print(results.table(measured))
        for line in results.acceptance(measured):
            print(line)
    busy_after = cpu_busy()
    if max(busy, busy_after) > BUSY_WARN_PCT:
        print(f"WARNING: CPUs {busy:.0f}% busy before the run and {busy_after:.0f}% after it: "
              "other work was competing, the numbers are low and noisy", file=sys.stderr)
    if done:
        meta = {**results.machine_metadata(), "run": prefix, "iperf3": {
            "duration_s": args.duration, "warmup_s": iperf.OMIT_S, "runs": args.runs,
            "pinning": pinning.describe()}, "requests_per_variant": args.requests,
            "scale": list(args.scale_levels), "endpoint_changes": args.endpoint_changes,
            "cold_services": args.cold_services, "endpoint_services": args.endpoint_services,
            "endpoints_per_service": args.endpoints_per_service, "cni_adds": args.cni_adds,
            "cni_parallel": args.cni_parallel,
            "policy_rounds": args.policy_rounds, "policy_pod_adds": args.policy_pod_adds,
            "cpu_busy_before_pct": round(busy, 1),
            "cpu_busy_after_pct": round(busy_after, 1)}
        for r in measured:
            r.extra["run"] = prefix  # kept entries of other scenarios carry their own run
        results.merge_write(args.output, measured, done, meta)
        print(f"\nresults for {', '.join(done)} merged into {args.output}", file=sys.stderr)
        _plots(args.output)
    return finish(0, failure, left, prefixes, "bench",
                  f"scenarios completed: {done or 'none'}")


def _plots(output: Path) -> None:
    """The PNGs of the merged results file, next to it (bench.plot)."""
    try:
        from . import plot

        written = plot.write_all(plot.load(output), output.parent)
    except ImportError as exc:
        print(f"no plots ({exc}; pip install matplotlib)", file=sys.stderr)
        return
    for p in written:
        print(f"plot written to {p}", file=sys.stderr)


def finish(status: int, failure: BaseException | None, left: list[str], prefixes: list[str],
           what: str, progress: str = "") -> int:
    """The exit status of a guarded run (run_guarded's failure and leftovers):
    130 when interrupted, 1 when it failed, else `status`; raises when the run
    left namespaces or pins behind, says so when it left nothing."""
    if failure is not None:
        if isinstance(failure, KeyboardInterrupt):
            print(f"interrupted; cleaned up{f' ({progress})' if progress else ''}",
                  file=sys.stderr)
            status = 130
        else:
            log.error("%s failed: %s", what, failure, exc_info=failure)
            status = 1
    if left:
        raise AssertionError(f"namespaces or pins of this run left behind: {left}")
    print(f"no namespace left with prefixes {', '.join(prefixes)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
