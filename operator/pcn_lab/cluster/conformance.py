"""`make conformance`: upstream's sig-network e2e tests on the real cluster.

The selection (focus patterns, skips with their reasons) is conformance.toml,
next to this file. The run is upstream's own: `ginkgo` driving `e2e.test`
(both built by `make k8s` from k8s.io/kubernetes at the pinned version) with
``--provider=local``, from inside the control-plane node's network namespace
(the tests reach node addresses and NodePorts as a machine of the cluster
would). Ginkgo writes JUnit; this module turns it into a results table
(test, result, seconds; skips with the reason the skip file gives) and a
bench-style JSON file, and the run's exit status is non-zero when any
selected test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pcn_lab.cluster.layout import Layout

SELECTION_FILE = Path(__file__).with_name("conformance.toml")
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


class SelectionError(ValueError):
    """conformance.toml is malformed (bad regular expression, a skip without a reason)."""


@dataclass(frozen=True)
class Skip:
    pattern: str
    reason: str


@dataclass(frozen=True)
class Selection:
    focus: tuple[str, ...]
    skips: tuple[Skip, ...]

    def selected(self, name: str) -> bool:
        """Whether a spec of this full name is one the run is about (focused)."""
        return any(re.search(p, name) for p in self.focus)

    def skip_reason(self, name: str) -> str | None:
        """The reason of the first skip matching `name`, None when none does."""
        for s in self.skips:
            if re.search(s.pattern, name):
                return s.reason
        return None


#: The conditions a skip's ``when`` may name: "no-sctp", this kernel opens no
#: SCTP socket (pcn_lab.cluster.policyapi.conditions() finds which hold).
CONDITIONS = frozenset({"no-sctp"})


def load_selection(path: Path = SELECTION_FILE,
                   present: frozenset[str] = frozenset()) -> Selection:
    """Parse a selection file (conformance.toml, netpol.toml): ``focus =
    [regex, ...]`` and ``[[skip]]`` tables with ``pattern``, a non-empty
    ``reason`` and an optional ``when`` (a member of CONDITIONS: the skip
    applies only when that condition is in `present`). Raises SelectionError."""
    data = tomllib.loads(path.read_text())
    focus = tuple(data.get("focus", []))
    if not focus:
        raise SelectionError(f"{path}: no focus patterns")
    skips: list[Skip] = []
    for i, entry in enumerate(data.get("skip", [])):
        pattern, reason = entry.get("pattern", ""), str(entry.get("reason", "")).strip()
        if not pattern or not reason:
            raise SelectionError(f"{path}: skip #{i + 1} needs both a pattern and a reason")
        when = str(entry.get("when", ""))
        if when and when not in CONDITIONS:
            raise SelectionError(f"{path}: skip #{i + 1}: unknown condition when = {when!r} "
                                 f"(known: {sorted(CONDITIONS)})")
        if not when or when in present:
            skips.append(Skip(pattern, reason))
    for p in (*focus, *(s.pattern for s in skips)):
        try:
            re.compile(p)
        except re.error as exc:
            raise SelectionError(f"{path}: bad regular expression {p!r}: {exc}") from exc
    return Selection(focus, tuple(skips))


def ginkgo_argv(bin_dir: Path, selection: Selection, out_dir: Path, kubeconfig: Path,
                parallel: int = 2, timeout: str = "4h", nodes: int = 2,
                e2e_args: Sequence[str] = ()) -> list[str]:
    """The upstream command line: ginkgo runs e2e.test in `parallel` processes
    (Ginkgo v2 runs [Serial] specs alone at the end), focus and skips as
    repeated --focus/--skip (OR'ed), JUnit into `out_dir`/junit.xml.
    `nodes`: the schedulable nodes (e2e's --num-nodes; with its default, -1,
    provider "local" skips every test that "Requires at least 2 nodes")."""
    argv = [str(bin_dir / "ginkgo"), f"--procs={parallel}", f"--timeout={timeout}",
            "--no-color", "--junit-report=junit.xml", f"--output-dir={out_dir}"]
    argv += [f"--focus={p}" for p in selection.focus]
    argv += [f"--skip={s.pattern}" for s in selection.skips]
    argv += [str(bin_dir / "e2e.test"), "--",
             f"--kubeconfig={kubeconfig}", "--provider=local",
             f"--kubectl-path={bin_dir / 'kubectl'}", f"--report-dir={out_dir}",
             "--dns-domain=cluster.local", f"--num-nodes={nodes}", *e2e_args]
    return argv


@dataclass(frozen=True)
class TestResult:
    name: str
    result: str  # passed | failed | skipped
    seconds: float
    detail: str = ""  # the failure message, or the skip's reason

    def to_json(self) -> dict[str, Any]:
        return {"test": self.name, "result": self.result, "seconds": round(self.seconds, 1),
                **({"detail": self.detail} if self.detail else {})}


def _spec_name(raw: str) -> str:
    """Ginkgo v2 JUnit names specs "[It] <full text>" (the tables drop the
    prefix) and suite nodes "[SynchronizedBeforeSuite]" and the like (kept)."""
    return re.sub(r"^\[It\]\s*", "", raw)


def parse_junit(path: Path, selection: Selection) -> list[TestResult]:
    """Results of the specs the selection is about, from Ginkgo's JUnit file.

    Specs outside the focus are left out (Ginkgo lists every spec of the
    suite, most of them filtered out); focused specs skipped by a skip
    pattern carry its reason; suite setup nodes count only when they fail
    (a failed BeforeSuite fails the run)."""
    root = ET.parse(path).getroot()
    out: list[TestResult] = []
    for case in root.iter("testcase"):
        raw = case.get("name", "")
        name = _spec_name(raw)
        seconds = float(case.get("time", "0") or 0)
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        status = case.get("status", "")
        if failure is not None or status in ("failed", "panicked", "timedout", "interrupted"):
            msg = (failure.get("message", "") if failure is not None else status) or status
            out.append(TestResult(name, FAILED, seconds, msg.strip().splitlines()[0][:300]
                                  if msg.strip() else status))
            continue
        if not selection.selected(name):
            continue  # outside the focus, or a suite node that passed
        if case.find("skipped") is not None or status in ("skipped", "pending"):
            reason = selection.skip_reason(name)
            if reason is None:
                skipped = case.find("skipped")
                reason = (skipped.get("message", "") if skipped is not None else "") or status
            out.append(TestResult(name, SKIPPED, seconds, reason))
        else:
            out.append(TestResult(name, PASSED, seconds))
    return out


def summary(results: Sequence[TestResult]) -> dict[str, int]:
    counts = Counter(r.result for r in results)
    return {"run": counts[PASSED] + counts[FAILED], PASSED: counts[PASSED],
            FAILED: counts[FAILED], SKIPPED: counts[SKIPPED]}


def table(results: Sequence[TestResult], width: int = 100,
          source: str = SELECTION_FILE.name) -> str:
    """The printed table: result, seconds, test; failures first, then passes,
    then skips (with their reasons, once per reason; `source` names the file
    the reasons come from)."""
    order = {FAILED: 0, PASSED: 1, SKIPPED: 2}
    lines = [f"{'result':<8} {'seconds':>8}  test", f"{'-' * 8} {'-' * 8}  {'-' * 40}"]
    for r in sorted((r for r in results if r.result != SKIPPED),
                    key=lambda r: (order[r.result], r.name)):
        name = r.name if len(r.name) <= width else r.name[: width - 3] + "..."
        lines.append(f"{r.result:<8} {r.seconds:>8.1f}  {name}")
        if r.result == FAILED and r.detail:
            lines.append(f"{'':<18}{r.detail[:width]}")
    skipped = Counter(r.detail for r in results if r.result == SKIPPED)
    for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]):
        lines.append(f"{SKIPPED:<8} {n:>8}x  {reason[:width]}")
    s = summary(results)
    lines.append(f"{s['run']} run: {s[PASSED]} passed, {s[FAILED]} failed; "
                 f"{s[SKIPPED]} skipped (reasons above, from {source} or the tests)")
    return "\n".join(lines)


# ------------------------------------------------------------------------ the run
DEFAULT_DIR = Path("/run/pcn-conformance")
DEFAULT_OUTPUT = Path(__file__).resolve().parents[3] / "bench" / "results" / "conformance.json"


def _say(msg: str) -> None:
    print(f"[conformance] {msg}", flush=True)


def _lab(lab_dir: Path, *args: str) -> int:
    """`pcn-lab --dir lab_dir ARGS` as a user types it (its output streams)."""
    return subprocess.call([sys.executable, "-m", "pcn_lab.cli", "--dir", str(lab_dir), *args])


def results_path(output: Path | None, extra_focus: Sequence[str], lab_dir: Path) -> Path:
    """Where a run's results go: `output` when given; else the committed
    bench/results/conformance.json for a run of the whole selection, and
    the lab folder's results.json for a rerun of some (`--focus`), which
    must not replace the full run's record."""
    if output is not None:
        return output
    return lab_dir / "results.json" if extra_focus else DEFAULT_OUTPUT


def write_results(path: Path, results: Sequence[TestResult], meta: dict[str, Any]) -> None:
    """bench/results-style JSON: machine, versions, summary and one row per test."""
    doc = {**meta, "summary": summary(results), "results": [r.to_json() for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


class BringupFailed(RuntimeError):
    """`pcn-lab up --kubernetes` failed (its output said why)."""


@dataclass
class LabRun:
    """A real cluster brought up for a run: its lab folder, its layout once
    up, and what `pcn-lab down` left (filled on the way out)."""

    lab_dir: Path
    layout: Layout | None = None
    left: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.left


@contextmanager
def real_cluster(lab_dir: Path, workers: int, keep: bool,
                 say: Callable[[str], None] = _say) -> Iterator[LabRun]:
    """Bring the real cluster up as a user does (`pcn-lab up --kubernetes`,
    a control plane and `workers` workers; a cluster left in `lab_dir` is
    taken down first), yield it, then take it down and record in
    ``LabRun.left`` what `cleanup.leftovers` still finds (processes, mounts,
    namespaces, cgroups). `keep` leaves it up. Raises BringupFailed."""
    from pcn_lab.cluster import cleanup
    from pcn_lab.cluster.state import ClusterState

    if ClusterState.load(lab_dir) is not None:
        say(f"a cluster is already up from {lab_dir}: taking it down first")
        _lab(lab_dir, "down")
    run = LabRun(lab_dir)
    try:
        say(f"bringing up the cluster (a control plane and {workers} workers) in {lab_dir}")
        if _lab(lab_dir, "up", "--kubernetes", "--nodes", str(workers)) != 0:
            raise BringupFailed("the cluster did not come up: see the lines above")
        state = ClusterState.load(lab_dir)
        assert state is not None, "pcn-lab up --kubernetes left no state"
        run.layout = state.layout
        yield run
    finally:
        if keep:
            say(f"--keep: the cluster stays up ({lab_dir}); `pcn-lab --dir {lab_dir} down`")
        else:
            _lab(lab_dir, "down")
            run.left = cleanup.leftovers(run.layout) if run.layout is not None else []
            if run.left:
                say("pcn-lab down left: " + ", ".join(run.left))
            else:
                say("pcn-lab down left nothing (processes, mounts, namespaces, cgroups)")


def inside_kubeconfig(run: LabRun) -> Path:
    """An admin kubeconfig (in the lab folder) with the API server's address
    on the lab's switch, for clients run in a node's network namespace."""
    from pcn_lab.cluster import kubeconfig

    assert run.layout is not None
    path = run.lab_dir / "e2e.kubeconfig"
    kubeconfig.write(path, kubeconfig.for_cert(run.layout, "admin",
                                               run.layout.api_url_inside()))
    return path


def in_control_plane(run: LabRun, argv: Sequence[str]) -> list[str]:
    """`argv` run in the control-plane node's network namespace (the tests
    reach node addresses and NodePorts as a machine of the cluster would)."""
    assert run.layout is not None
    return ["ip", "netns", "exec", run.layout.control_plane, *argv]


def run_ginkgo(run: LabRun, selection: Selection, report: Path, procs: int, workers: int,
               say: Callable[[str], None] = _say) -> tuple[int, Path | None]:
    """Upstream's e2e (ginkgo_argv) with `selection` on the cluster, from the
    control plane's network namespace; its output in `report`/e2e.log.
    Returns (ginkgo's exit status, the JUnit file or None when ginkgo wrote
    none)."""
    from pcn_lab.cluster import artifacts

    assert run.layout is not None
    report.mkdir(parents=True, exist_ok=True)
    argv = ginkgo_argv(artifacts.bin_dir(), selection, report, inside_kubeconfig(run),
                       parallel=procs, nodes=workers)  # the control plane is tainted
    say(f"running upstream e2e ({artifacts.versions()['kubernetes']['version']}) from "
        f"{run.layout.control_plane}'s network namespace, {procs} processes; log in "
        f"{report / 'e2e.log'}")
    with open(report / "e2e.log", "w", buffering=1) as log:  # line by line: followable
        code = stream(in_control_plane(run, argv), log)
    junit = report / "junit.xml"
    if not junit.is_file():
        say(f"ginkgo exited {code} without a JUnit report: see {report / 'e2e.log'}")
        return code, None
    return code, junit


def machine_meta(started: float) -> dict[str, Any]:
    """The results files' common fields: date, kernel, CPUs, Kubernetes, minutes."""
    from pcn_lab.cluster import artifacts

    return {"date": datetime.now(UTC).replace(microsecond=0).isoformat(),
            "kernel": platform.release(), "cpu_count": os.cpu_count(),
            "kubernetes": artifacts.versions()["kubernetes"]["version"],
            "minutes": round((time.monotonic() - started) / 60, 1)}


def run(lab_dir: Path, workers: int, procs: int, output: Path | None, keep: bool,
        extra_focus: Sequence[str] = ()) -> int:
    """Bring the real cluster up as a user does (`pcn-lab up --kubernetes`),
    run upstream's selection on it, take it down and check nothing is left.
    Returns the exit status: 0 only when every selected test passed and the
    teardown left nothing."""
    from pcn_lab.cluster import artifacts

    for name in ("e2e.test", "ginkgo", "kubectl"):
        artifacts.binary(name)  # FileNotFoundError names `make k8s`
    selection = load_selection()
    if extra_focus:  # a rerun of some: these patterns instead of the file's focus
        selection = Selection(tuple(extra_focus), selection.skips)
    output = results_path(output, extra_focus, lab_dir)
    started = time.monotonic()
    status = 1
    try:
        with real_cluster(lab_dir, workers, keep) as lab:
            code, junit = run_ginkgo(lab, selection, lab_dir / "e2e", procs, workers)
            if junit is None:
                return 1
            results = parse_junit(junit, selection)
            print(table(results))
            write_results(output, results, {**machine_meta(started), "workers": workers,
                                            "procs": procs,
                                            "selection": str(SELECTION_FILE.name),
                                            **({"focus": list(extra_focus)}
                                               if extra_focus else {})})
            _say(f"results in {output}; JUnit in {junit}")
            s = summary(results)
            status = 0 if s[FAILED] == 0 and s["run"] > 0 and code == 0 else 1
    except BringupFailed as exc:
        _say(str(exc))
        return 1
    return status if lab.clean else 1


def stream(argv: list[str], log: Any) -> int:
    """Run `argv`, its output to `log` and, one line in ten plus every
    failure line, to the console (Ginkgo's own progress)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for i, line in enumerate(proc.stdout):
        log.write(line)
        if "[FAIL]" in line or "Ran " in line or i % 10 == 0 and line.strip():
            print(line.rstrip()[:160], flush=True)
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pcn_lab.cluster.conformance",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                    help="the cluster's lab directory (%(default)s)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--procs", type=int, default=2, help="ginkgo processes (%(default)s)")
    ap.add_argument("--output", type=Path, default=None,
                    help=f"results file (default {DEFAULT_OUTPUT}; with --focus, the lab "
                         "folder's results.json)")
    ap.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    ap.add_argument("--focus", action="append", default=[],
                    help="run only specs matching this (repeatable; the skips still apply)")
    args = ap.parse_args(argv)
    try:
        return run(args.dir, args.workers, args.procs, args.output, args.keep, args.focus)
    except FileNotFoundError as exc:
        _say(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
