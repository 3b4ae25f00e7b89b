"""`make netpol`: the judges of network policy enforcement on the real cluster.

Two upstream suites, one after the other on one cluster (`pcn-lab up
--kubernetes`, brought up and taken down as `make conformance` does, with the
same machinery, pcn_lab.cluster.conformance):

1. Kubernetes' NetworkPolicy e2e (test/e2e/network/netpol of the pinned
   k8s.io/kubernetes: the Netpol, Netpol [LinuxOnly] and Netpol API specs),
   selected as kube-network-policies' CI selects them (``--focus
   'Netpol|NetworkPolicy'``, ``--provider=local``). Each spec makes three
   namespaces of agnhost ``porter`` pods, each behind a ClusterIP Service,
   applies policies and probes every pod pair through the Services with
   ``/agnhost connect`` by pod exec (3 probes at a time, 3 s timeout, 10 s of
   retries for a pair whose result is not the expected one, the whole matrix
   twice on a mismatch). Results: bench/results/netpol.json.
2. sigs.k8s.io/network-policy-api's conformance suite (ClusterNetworkPolicy,
   the CRD pcn's manifests install), its test binary built by `make k8s`
   (pcn_lab.cluster.policyapi). Results: bench/results/network-policy-api.json.

The selection of both, with every skip's reason, is netpol.toml; skips with
``when = "no-sctp"`` apply only on a kernel without SCTP. Each suite prints
a table (result, seconds, test). The exit status is 0 only when every
selected test of both passed and `pcn-lab down` left nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pcn_lab.cluster import policyapi
from pcn_lab.cluster.conformance import (
    DEFAULT_OUTPUT,
    FAILED,
    BringupFailed,
    LabRun,
    Selection,
    TestResult,
    in_control_plane,
    inside_kubeconfig,
    load_selection,
    machine_meta,
    parse_junit,
    real_cluster,
    run_ginkgo,
    summary,
    table,
    write_results,
)

SELECTION_FILE = policyapi.SELECTION_FILE
DEFAULT_DIR = Path("/run/pcn-netpol")
RESULTS_DIR = DEFAULT_OUTPUT.parent
E2E_OUTPUT = RESULTS_DIR / "netpol.json"
API_OUTPUT = RESULTS_DIR / "network-policy-api.json"
SUITES = ("e2e", "api")


def _say(msg: str) -> None:
    print(f"[netpol] {msg}", flush=True)


def needed_binaries(suites: Sequence[str], nosctp: bool) -> list[str]:
    """The binaries of bin/ the chosen suites run."""
    need = ["kubectl"]
    if "e2e" in suites:
        need += ["e2e.test", "ginkgo"]
    if "api" in suites:
        need += [policyapi.BINARY_NOSCTP if nosctp else policyapi.BINARY, "test2json"]
    return need


def run_api(run: LabRun, selection: policyapi.ApiSelection,
            skips: Sequence[policyapi.ApiSkip], nosctp: bool, report: Path, only: str = ""
            ) -> tuple[int, list[TestResult]]:
    """The network-policy-api suite on the cluster, from the control plane's
    network namespace as the e2e runs (the suite itself only talks to the API
    server: exec into its client pods). Its JSON events go to
    `report`/network-policy-api.jsonl (followable). Returns (the exit status
    of test2json, which is the test binary's, and the results rows)."""
    from pcn_lab.cluster import artifacts

    report.mkdir(parents=True, exist_ok=True)
    argv = policyapi.argv(artifacts.bin_dir(), selection, skips, nosctp, only=only)
    env = dict(os.environ, KUBECONFIG=str(inside_kubeconfig(run)))
    events = report / "network-policy-api.jsonl"
    _say(f"running {selection.module}@{selection.version} conformance "
         f"({'without its SCTP servers, ' if nosctp else ''}features "
         f"{','.join(selection.features) or 'standard'}); events in {events}")
    with open(events, "w", buffering=1) as log:
        proc = subprocess.Popen(in_control_plane(run, argv), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=report)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if '"Action":"pass"' in line or '"Action":"fail"' in line:
                print(line.rstrip()[:160], flush=True)
        code = proc.wait()
    return code, policyapi.parse_events(events.read_text().splitlines(), skips)


def output_paths(lab_dir: Path, extra_focus: Sequence[str], api_run: str,
                 e2e_output: Path | None = None, api_output: Path | None = None
                 ) -> tuple[Path, Path]:
    """Where the e2e and the api results go: as given; else the committed
    bench/results files for a whole suite, and the suite's folder in the lab
    directory for a narrowed run (`--focus`, `--api-run`), which must not
    replace the full run's record."""
    if e2e_output is None:
        e2e_output = lab_dir / "e2e" / "results.json" if extra_focus else E2E_OUTPUT
    if api_output is None:
        api_output = lab_dir / "network-policy-api" / "results.json" if api_run else API_OUTPUT
    return e2e_output, api_output


def run(lab_dir: Path, workers: int, procs: int, keep: bool, suites: Sequence[str],
        extra_focus: Sequence[str] = (), api_run: str = "",
        e2e_output: Path | None = None, api_output: Path | None = None) -> int:
    """Bring the cluster up, run the chosen `suites` ("e2e", "api") on it,
    print their tables, write their results files, take it down, check that
    nothing is left. `extra_focus` replaces the e2e focus (the skips stay);
    `api_run` narrows the api suite to TestConformance/<regex>. Results go
    to `e2e_output` / `api_output` when given; else a whole suite's to the
    committed bench/results files, a narrowed one's to its folder in the lab
    directory (results.json), not over the full run's record. Returns the
    exit status (0: every selected test passed, nothing left)."""
    from pcn_lab.cluster import artifacts

    present = policyapi.conditions()
    nosctp = policyapi.NO_SCTP in present
    for name in needed_binaries(suites, nosctp):
        artifacts.binary(name)  # FileNotFoundError names `make k8s`
    if nosctp:
        _say("this kernel has no SCTP (no SCTP socket opens): the skips of netpol.toml "
             "marked when = \"no-sctp\" apply")
    selection = load_selection(SELECTION_FILE, present)
    if extra_focus:
        selection = Selection(tuple(extra_focus), selection.skips)
    api = policyapi.load()
    api_skips = api.active_skips(present)
    started = time.monotonic()
    ok = True
    meta: dict[str, object] = {"workers": workers, "procs": procs,
                               "selection": SELECTION_FILE.name, "sctp": not nosctp}
    # a partial run says so in its results
    e2e_meta: dict[str, object] = {"focus": list(extra_focus)} if extra_focus else {}
    api_meta: dict[str, object] = {"api_run": api_run} if api_run else {}
    e2e_output, api_output = output_paths(lab_dir, extra_focus, api_run, e2e_output,
                                          api_output)
    try:
        with real_cluster(lab_dir, workers, keep, say=_say) as lab:
            if "e2e" in suites:
                code, junit = run_ginkgo(lab, selection, lab_dir / "e2e", procs, workers,
                                         say=_say)
                if junit is None:
                    ok = False
                else:
                    results = parse_junit(junit, selection)
                    print(table(results, source=SELECTION_FILE.name))
                    write_results(e2e_output, results, {**machine_meta(started), **meta,
                                                        **e2e_meta,
                                                        "suite": "kubernetes netpol e2e"})
                    _say(f"NetworkPolicy e2e results in {e2e_output}; JUnit in {junit}")
                    ok &= _passed(results) and code == 0
            if "api" in suites:
                api_started = time.monotonic()
                code, results = run_api(lab, api, api_skips, nosctp,
                                        lab_dir / "network-policy-api", api_run)
                print(table(results, source=SELECTION_FILE.name))
                write_results(api_output, results, {
                    **machine_meta(api_started), **meta, **api_meta,
                    "suite": f"{api.module}@{api.version} conformance",
                    "supported_features": list(api.features)})
                _say(f"network-policy-api results in {api_output}")
                ok &= _passed(results) and code == 0
    except BringupFailed as exc:
        _say(str(exc))
        return 1
    return 0 if ok and lab.clean else 1


def _passed(results: Sequence[TestResult]) -> bool:
    s = summary(results)
    return s[FAILED] == 0 and s["run"] > 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pcn_lab.cluster.netpol",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                    help="the cluster's lab directory (%(default)s)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--procs", type=int, default=2, help="ginkgo processes (%(default)s)")
    ap.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    ap.add_argument("--suite", choices=SUITES, action="append",
                    help="run only this suite (repeatable; default: both)")
    ap.add_argument("--focus", action="append", default=[],
                    help="e2e: run only specs matching this (repeatable; the skips still apply)")
    ap.add_argument("--api-run", default="", metavar="REGEX",
                    help="network-policy-api: run only TestConformance/REGEX")
    ap.add_argument("--e2e-output", type=Path, default=None,
                    help=f"(default: {E2E_OUTPUT}; with --focus DIR/e2e/results.json)")
    ap.add_argument("--api-output", type=Path, default=None,
                    help=f"(default: {API_OUTPUT}; with --api-run "
                         "DIR/network-policy-api/results.json)")
    args = ap.parse_args(argv)
    try:
        return run(args.dir, args.workers, args.procs, args.keep, args.suite or list(SUITES),
                   args.focus, args.api_run, args.e2e_output, args.api_output)
    except FileNotFoundError as exc:
        _say(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
