"""pcn demo: the README's walk-through, run end to end.

1. `pcn-lab up -f examples/`: an emulated Kubernetes API on loopback, two
   nodes (network namespaces) each with a real pcn-agent, the example app's
   pods wired by the real pcn-cni, its Services and the GitOps firewall chain
   applied as `kubectl apply` would.
2. `pcn-lab check`: the connectivity matrix (pod to pod on one node and across
   nodes, ClusterIP, NodePort with both traffic policies, egress SNAT).
3. `kubectl pcn add-cube firewall ...` puts a firewall in front of the web
   pods; the demo measures how soon traffic changes, shows `kubectl pcn
   chain` and `kubectl get cubechains`, then removes it again.
4. `pcn-lab down`, also when something fails; exit status non-zero if any
   check failed or anything was left behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pcn_lab import checks
from pcn_lab import cli as lab

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FIREWALL = "no-web"


def _progress(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def _env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "KUBECONFIG": str(lab.LAB_ROOT / "kubeconfig")}


def _run(argv: list[str], show: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    if show:
        print(f"\n$ {' '.join(argv)}", flush=True)
    r = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=600)
    if show and r.stdout.strip():
        print(r.stdout.rstrip(), flush=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r


def _kubectl_pcn() -> list[str]:
    """`kubectl pcn` when kubectl is installed (it finds kubectl-pcn on PATH)."""
    return ["kubectl", "pcn"] if shutil.which("kubectl") else ["kubectl-pcn"]


def _wait_ready(state: lab.LabState, timeout: float = 120) -> None:
    """Until the example's pods run and a first full matrix passes (the agents
    realise Services within a second or two of their endpoints)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = lab._pods(state)
        if all(pods.get(p, {}).get("status", {}).get("podIP") for p in ("web-1", "web-2",
                                                                       "client")):
            rows = lab.connectivity(state)
            if len(rows) >= 8 and all(r.passed for r in rows):
                return
        time.sleep(1)


def _probe_web(state: lab.LabState) -> bool:
    view = lab._LabView(state)
    r = checks.probe(view, "client", ["tcp", view.pods["web-1"].ip, "8080", "--timeout", "0.3"],
                     10)
    return bool(r.get("ok"))


def firewall_rows(state: lab.LabState) -> list[checks.CheckResult]:
    rows: list[checks.CheckResult] = []
    before = _probe_web(state)
    rows.append(checks.CheckResult("client", "web-1:8080", "tcp (no firewall yet)", before))
    _run([*_kubectl_pcn(), "add-cube", "firewall", FIREWALL, "-n", "demo", "--selector",
          "app=web", "--hook", "ingress", "--rule", "drop tcp dport 8080"])
    start = time.monotonic()
    blocked_after = None
    while time.monotonic() - start < 10:
        sent = time.monotonic()  # the connection attempt that gets dropped starts here
        if not _probe_web(state):
            blocked_after = sent - start
            break
    rows.append(checks.CheckResult(
        "client", "web-1:8080", "tcp after add-cube", blocked_after is None,
        blocked_after * 1000 if blocked_after is not None else None,
        f"first connection dropped was started {blocked_after * 1000:.0f} ms after "
        "`kubectl pcn add-cube` returned"
        if blocked_after is not None else "still answering 10 s later", expect_blocked=True))
    time.sleep(2.5)  # let the agents publish counters (every 2 s)
    _run([*_kubectl_pcn(), "chain", "web-1", "-n", "demo"])
    _run(["kubectl", "get", "cubechains,networkfunctions", "-A"], check=False) \
        if shutil.which("kubectl") else None
    _run([*_kubectl_pcn(), "remove-cube", FIREWALL, "-n", "demo"])
    restored = False
    start = time.monotonic()
    while time.monotonic() - start < 10 and not restored:
        restored = _probe_web(state)
    rows.append(checks.CheckResult("client", "web-1:8080", "tcp after remove-cube", restored,
                                   (time.monotonic() - start) * 1000 if restored else None,
                                   "answering again" if restored else "still blocked"))
    return rows


@lab.quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pcn-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2, help="nodes in the lab (default 2)")
    ap.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("pcn-demo builds network namespaces and loads eBPF programs: run it as root",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    results: list[checks.CheckResult] = []
    lab_bin = [sys.executable, "-m", "pcn_lab.cli"]
    failed_step = ""
    prefix = ""
    try:
        _progress("starting the lab (an API server, two nodes with an agent each, the example "
                  "app); the first compile of the cubes takes a few seconds per node")
        _run([*lab_bin, "down"], show=False, check=False)
        _run([*lab_bin, "up", "--nodes", str(args.nodes), "--pods-per-node", "0",
              "-f", str(EXAMPLES)])
        state = lab.LabState.load(lab.LAB_ROOT)
        assert state is not None
        prefix = state.prefix
        if shutil.which("kubectl"):
            _run(["kubectl", "get", "pods,services", "-n", "demo", "-o", "wide"], check=False)
        _progress("connectivity matrix")
        _wait_ready(state)
        results = lab.connectivity(state)
        print("\n" + checks.render(results, symbols=True))
        _progress("inserting a firewall with kubectl pcn add-cube")
        results += firewall_rows(state)
    except Exception as exc:
        failed_step = f"{type(exc).__name__}: {exc}"
    finally:
        if not args.keep:
            _progress("tearing the lab down")
            _run([*lab_bin, "down"], show=False, check=False)
    left = [ns for ns in _netns_list() if prefix and ns.startswith(prefix)] \
        if not args.keep else []
    if not args.keep and lab.LAB_ROOT.exists():
        left.append(str(lab.LAB_ROOT))
    print("\n" + checks.render(results, symbols=True))
    failed = [r for r in results if not r.passed]
    if failed_step:
        print(f"\ndemo stopped: {failed_step}", file=sys.stderr)
    if left:
        print(f"\nleft behind: {left}", file=sys.stderr)
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed"
          f"{', nothing left behind' if not left and not args.keep else ''} "
          f"({time.monotonic() - started:.0f} s)")
    return 1 if failed or failed_step or left or not results else 0


def _netns_list() -> list[str]:
    from pyroute2 import netns as pr_netns

    return list(pr_netns.listnetns())


if __name__ == "__main__":
    sys.exit(main())
