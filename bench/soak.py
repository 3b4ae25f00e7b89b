"""`make soak`: the agent restart soak (issue 9).

    .venv/bin/python -m bench.soak [--restarts N] [--rate CONN_PER_S] [--stream-rate B_PER_S]
                                   [--dwell S] [--churn-pods N] [--seed N] [--output FILE]

The real `pcn-agent` runs as a subprocess against the emulated API server on
a one-node lab (bench.controlplane.AgentProcess: the agent builds the node's
data plane itself). In the node: a backend pod behind a ClusterIP Service
(port 80 -> a request/response server, port 9000 -> a byte sink), a client
pod, and a few "churn" pods; the lab's external host serves the same two
servers, reached from the client through masquerading (the node's egress
SNAT). All pods are added and deleted by the real `pcn-cni`, run as the
kubelet stand-in runs it (pcn_lab.kubelet.run_cni, host-local IPAM).

Traffic for the whole soak, from the client pod (bench.soakload):
* two long transfers, one connection each, paced (--stream-rate): through
  the ClusterIP and through masquerading; each must deliver every byte, in
  order and intact, on its one connection;
* short request/response connections, --rate per second through the
  ClusterIP and as many through masquerading; each must succeed.

Then N restarts of the agent, alternating SIGTERM (kopf's orderly shutdown)
and SIGKILL (a crash), each after a random wait of up to --dwell seconds from
the moment the previous agent served CNI (so signals land at different points
of the agent's life). While the agent is down, the oldest churn pod is
deleted (CNI DEL, which works without the agent; its Pod object goes too) and
a new pod is added: CNI ADD must fail cleanly (CNI error 11, "try again
later"; no link, address or reservation left; the runtime then runs DEL, as
containerd does after a failed set-up). The agent is started again (every
--crash-start-every'th time it is also killed at a random moment of its
first seconds, while it compiles and adopts, and started once more: a crash
loop). The kubelet's ADD is made again as soon as the agent's local API says
it is ready (asked every 20 ms, like CNI STATUS: cheap, so the waiting takes
no CPU from the starting agent) and retried while it answers "try again
later": the time from starting the agent process to the end of the first
successful ADD is the restart's "time to serve CNI". The new pod must reach
the Service and the external host at once.

At the end the traffic stops and is accounted for (with the data plane's
drop counters over the soak, by cube and reason, to say where packets went),
and the node is checked for consistency: the pods the agent reports (its
status ConfigMap), the pod links in the node and host-local's reservations
must all be exactly the live pods.

Figures and targets (issue 9): connections failed (short connections, the
new pods' first connections, and the long transfers that did not complete on
their one connection) 0; bytes lost (sent by a long transfer and not
received, all it sent if what arrived is not intact) 0; time to serve CNI
after each restart < 5 s. The run exits 1 when a target is missed or the
node is inconsistent at the end. Results go to bench/results/soak.json
(bench.results format; per-restart records included); the agent's log is
copied next to the system's temporary files and its path printed.
Everything is built in namespaces named after this run and removed at the
end, also on Ctrl-C; the run fails if any of them is left.
"""

from __future__ import annotations

import argparse
import bisect
import ipaddress
import json
import logging
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pyroute2 import IPRoute

from pcn_agent.cni import localapi
from pcn_agent.cni.link import host_ifname
from pcn_agent.cni.spec import TRY_AGAIN_LATER
from pcn_lab import checks, kubelet
from pcn_lab.apiserver import ApiServerError, apply, delete, get
from pcn_lab.topology import EXTERNAL_IP

from . import iperf, netns, results
from .bpfmaps import CubeDrops
from .controlplane import AgentProcess, endpoint_slice
from .results import Result, now_iso
from .run import cpu_busy, finish, preflight, run_guarded, setup_logging
from .scenarios import MTU, Context

log = logging.getLogger("bench.soak")

SCENARIO = results.SOAK
DEFAULT_OUTPUT = results.DEFAULT_OUTPUT.parent / "soak.json"
NAMESPACE = "soak"
VIP = "10.96.0.60"
RR_PORT, SINK_PORT = 8090, 9000  # the servers' ports, in the backend and on the external host
SVC_RR_PORT, SVC_SINK_PORT = 80, 9000  # the Service's
ROOT = Path(__file__).resolve().parent.parent  # `python -m bench.soakload` runs from here
POLL_S = 0.02  # the agent's local API is asked whether it is ready this often
RETRY_S = 0.1  # CNI ADD retry period once it said it is
SERVE_TIMEOUT_S = 120.0  # give up on a restart whose agent never serves CNI
CRASH_START_MAX_S = 3.0  # --crash-start-every: SIGKILL this long (at most) after a start
CONSISTENT_TIMEOUT_S = 15.0  # the status ConfigMap is written every 2 s
POD_LINK = re.compile(r"pcn[0-9a-f]{8}")  # pcn_agent.cni.link.host_ifname's names


# ------------------------------------------------------------------ processes
@dataclass
class Load:
    """A traffic process in a namespace; its JSON lines are collected as they come."""

    name: str
    proc: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, name: str, ns: str, argv: list[str], stderr: IO[str]) -> Load:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL)
        load = cls(name, proc)
        load.reader = threading.Thread(target=load._read, name=f"soak-{name}", daemon=True)
        load.reader.start()
        return load

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                self.events.append({"event": "garbage", "line": line.rstrip()[-200:]})

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if e.get("event") == event or event in e:  # pcn_lab.probe: {"listening": ..}
                    return e
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {event!r} (exit {self.proc.poll()}; "
                           f"events {self.events[-3:]})")

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the load's own orderly end), then its last lines."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.reader is not None:
            self.reader.join(timeout=10)
        return self.proc.returncode


def soakload(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.soakload", *args]


# ------------------------------------------------------------------ the kubelet's part
class Pods:
    """Pods of the soak, added and deleted with the real pcn-cni."""

    def __init__(self, ctx: Context, agent: AgentProcess) -> None:
        self.ctx = ctx
        self.agent = agent
        self.ipam_dir = agent.dir / "ipam"
        self.conf = kubelet.network_config(agent.pod_cidr, agent.gateway, str(agent.socket),
                                           str(self.ipam_dir), mtu=MTU)
        self.live: dict[str, kubelet.PodSandbox] = {}

    def sandbox(self, name: str) -> kubelet.PodSandbox:
        """The pod's namespace, made before CNI as a runtime makes the sandbox."""
        ns = self.ctx.nss.create(name)
        return kubelet.PodSandbox(NAMESPACE, name, secrets.token_hex(16), ns)

    def add(self, sb: kubelet.PodSandbox) -> None:
        """CNI ADD (raises kubelet.CniError), then the Pod as the kubelet reports it."""
        result = kubelet.run_cni(self.agent.node, "ADD", sb, self.conf)
        sb.ip = str(ipaddress.IPv4Interface(result["ips"][0]["address"]).ip)
        self.live[sb.name] = sb
        apply(self.agent.api, kubelet.pod_object(sb, self.agent.node, {"app": sb.name}))

    def new(self, name: str) -> kubelet.PodSandbox:
        sb = self.sandbox(name)
        self.add(sb)
        return sb

    def delete(self, sb: kubelet.PodSandbox) -> None:
        """The Pod object goes, CNI DEL (works without an agent), the namespace goes."""
        delete(self.agent.api, kubelet.pod_object(sb, self.agent.node, {}))
        kubelet.run_cni(self.agent.node, "DEL", sb, self.conf)
        self.live.pop(sb.name, None)
        self.ctx.nss.remove(sb.netns)

    def delete_all(self) -> None:
        for sb in list(self.live.values()):
            try:
                self.delete(sb)
            except Exception as exc:  # keep tearing down; the leftover check reports
                log.warning("deleting pod %s: %s", sb.name, exc)

    def refused_cleanly(self, sb: kubelet.PodSandbox) -> dict[str, Any]:
        """CNI ADD while no agent runs: it must fail with "try again later" and
        leave nothing (no host link, no pod interface, no address reserved);
        then DEL, as the runtime tears down a failed sandbox set-up."""
        out: dict[str, Any] = {"refused": False, "clean": False}
        try:
            kubelet.run_cni(self.agent.node, "ADD", sb, self.conf)
        except kubelet.CniError as exc:
            out.update(refused=True, code=exc.result.get("code"), msg=exc.result.get("msg"))
        else:
            out["problem"] = "CNI ADD succeeded with no agent running"
            self.live[sb.name] = sb
            return out
        left = []
        if out["code"] != TRY_AGAIN_LATER:
            left.append(f"error code {out['code']}, not {TRY_AGAIN_LATER} (try again later)")
        if host_ifname(sb.container_id) in links(self.agent.node):
            left.append(f"host link {host_ifname(sb.container_id)} left in the node")
        pod_links = [n for n in links(sb.netns) if n != "lo"]
        if pod_links:
            left.append(f"interfaces {pod_links} left in the pod")
        if sb.container_id in self.reservations().values():
            left.append("its address is still reserved by host-local")
        out["clean"] = not left
        if left:
            out["problem"] = "; ".join(left)
        kubelet.run_cni(self.agent.node, "DEL", sb, self.conf)
        return out

    def reservations(self) -> dict[str, str]:
        """host-local's reservations: address -> container id."""
        out = {}
        d = self.ipam_dir / self.conf["name"]
        if d.is_dir():
            for f in d.iterdir():
                try:
                    ipaddress.IPv4Address(f.name)
                except ValueError:
                    continue  # its lock and last_reserved_ip files
                out[f.name] = f.read_text().split()[0] if f.read_text().strip() else ""
        return out


def links(ns: str) -> set[str]:
    with IPRoute(netns=ns) as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


# ------------------------------------------------------------------ the soak
@dataclass
class Soak:
    ctx: Context
    args: argparse.Namespace
    agent: AgentProcess
    pods: Pods
    rng: random.Random
    loads: dict[str, Load] = field(default_factory=dict)
    kills: list[float] = field(default_factory=list)  # monotonic time of each restart's signal
    restarts: list[dict[str, Any]] = field(default_factory=list)
    churn: list[kubelet.PodSandbox] = field(default_factory=list)
    cold_serve_s: float = 0.0
    new_pod_failures: list[dict[str, Any]] = field(default_factory=list)
    streams_ended: dict[str, int] = field(default_factory=dict)  # name -> restart it ended in
    drops_before: dict[str, dict[str, int]] = field(default_factory=dict)

    # -------------------------------------------------------------- set-up
    def load(self, st: ExitStack, name: str, ns: str, argv: list[str]) -> Load:
        errf = open(self.ctx.tmp / f"{name}.stderr", "w")  # noqa: SIM115 - closed by st
        st.callback(errf.close)
        ld = Load.start(name, ns, argv, errf)
        st.callback(ld.stop)
        self.loads[name] = ld
        return ld

    def servers(self, st: ExitStack, who: str, ns: str) -> None:
        self.load(st, f"{who}-rr", ns, checks.probe_argv("serve", "--rr", str(RR_PORT)))
        self.load(st, f"{who}-sink", ns, soakload("sink", str(SINK_PORT)))
        self.loads[f"{who}-rr"].wait_for("listening")
        self.loads[f"{who}-sink"].wait_for("listening")

    def reach(self, sb: kubelet.PodSandbox) -> dict[str, Any]:
        """One request/response exchange from `sb` with the Service and with the
        external host (masquerading)."""
        r = subprocess.run(["ip", "netns", "exec", sb.netns,
                            *soakload("check", f"{VIP}:{SVC_RR_PORT}", f"{EXTERNAL_IP}:{RR_PORT}")],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        answers = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        return {"ok": r.returncode == 0 and len(answers) == 2 and all(a["ok"] for a in answers),
                "answers": answers, "stderr": r.stderr[-300:]}

    def setup(self, st: ExitStack) -> None:
        ctx, agent = self.ctx, self.agent
        t0 = agent.start(st)
        served, attempts = self.add_when_served(self.pods.sandbox("backend"), t0)
        self.cold_serve_s = served
        ctx.progress(f"agent cold start: CNI served {served:.2f} s after the start "
                     f"({attempts} ADD attempts)")
        st.callback(self.pods.delete_all)  # while the agent still runs (LIFO)
        backend = self.pods.live["backend"]
        client = self.pods.new("client")
        self.churn = [self.pods.new(f"churn-{k}") for k in range(self.args.churn_pods)]
        self.servers(st, "backend", backend.netns)
        self.servers(st, "ext", agent.lab.ext_ns)
        apply(agent.api, {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "soak", "namespace": NAMESPACE, "uid": "uid-soak"},
            "spec": {"clusterIP": VIP, "type": "ClusterIP", "ports": [
                {"name": "rr", "port": SVC_RR_PORT, "protocol": "TCP", "targetPort": RR_PORT},
                {"name": "sink", "port": SVC_SINK_PORT, "protocol": "TCP",
                 "targetPort": SINK_PORT}]}})
        sl = endpoint_slice("soak-abc", "soak", [backend.ip])
        sl["metadata"]["namespace"] = NAMESPACE
        sl["ports"] = [{"name": "rr", "port": RR_PORT, "protocol": "TCP"},
                       {"name": "sink", "port": SINK_PORT, "protocol": "TCP"}]
        apply(agent.api, sl)
        deadline = time.monotonic() + 60
        while not (r := self.reach(client))["ok"]:
            agent.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the client cannot reach {VIP} and {EXTERNAL_IP} 60 s after "
                                   f"the Service was created: {r}")
            time.sleep(0.2)
        rate = str(self.args.stream_rate)
        self.load(st, "stream-clusterip", client.netns,
                  soakload("stream", VIP, str(SVC_SINK_PORT), "--rate", rate))
        self.load(st, "stream-masquerade", client.netns,
                  soakload("stream", EXTERNAL_IP, str(SINK_PORT), "--rate", rate))
        self.load(st, "short-clusterip", client.netns,
                  soakload("connect", VIP, str(SVC_RR_PORT), "--rate", str(self.args.rate)))
        self.load(st, "short-masquerade", client.netns,
                  soakload("connect", EXTERNAL_IP, str(RR_PORT), "--rate", str(self.args.rate)))
        for name in ("stream-clusterip", "stream-masquerade"):
            self.loads[name].wait_for("connected")
        for name in ("short-clusterip", "short-masquerade"):
            self.loads[name].wait_for("started")
        time.sleep(1.0)  # traffic flowing before the first signal
        self.drops_before = self.drops()
        ctx.progress(f"traffic: 2 long transfers at {self.args.stream_rate / 1024:.0f} KiB/s, "
                     f"{self.args.rate:g} short connections/s through {VIP} and as many "
                     f"through masquerading to {EXTERNAL_IP}")

    def add_when_served(self, sb: kubelet.PodSandbox, t0: float) -> tuple[float, int]:
        """CNI ADD of `sb` as soon as the agent started at `t0` serves: its local
        API is asked every POLL_S whether it is ready (a "status" request, what
        CNI STATUS asks: cheap, so that the waiting takes no CPU from the
        starting agent, unlike ADDs retried in a loop, which each run pcn-cni and
        host-local twice); then ADD, retried every RETRY_S while it answers
        "try again later". Returns (seconds from `t0` to the end of the ADD that
        succeeded, ADD attempts)."""
        attempts = 0
        while True:
            if self.agent_ready():
                attempts += 1
                try:
                    self.pods.add(sb)
                    return time.monotonic() - t0, attempts
                except kubelet.CniError as exc:
                    if exc.result.get("code") != TRY_AGAIN_LATER:
                        raise RuntimeError(f"CNI ADD of {sb.name} failed for another reason "
                                           f"than the agent's absence: {exc}; agent log:\n"
                                           f"{self.agent.log_tail()}") from None
                time.sleep(RETRY_S)
            self.agent.check_alive()
            if time.monotonic() - t0 > SERVE_TIMEOUT_S:
                raise RuntimeError(f"the agent did not serve CNI within {SERVE_TIMEOUT_S:.0f} s "
                                   f"of its start; its log ends:\n{self.agent.log_tail()}")
            time.sleep(POLL_S)

    def agent_ready(self) -> bool:
        try:
            status = localapi.call(self.agent.socket, {"op": "status"}, timeout=2.0)
        except localapi.LocalApiError:
            return False
        return bool(status.get("ready"))

    def drops(self) -> dict[str, dict[str, int]]:
        """The node's data-plane drops so far, by cube and reason (pinned counters)."""
        state = json.loads((self.agent.state_dir / f"{self.agent.node}.json").read_text())
        cubes = {int(c["id"]): str(c["name"]) for c in state["cubes"]}
        d = CubeDrops(self.agent.pin_dir)
        try:
            return d.read(cubes)
        finally:
            d.close()

    # -------------------------------------------------------------- one restart
    def restart(self, i: int, st: ExitStack) -> dict[str, Any]:
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
        time.sleep(self.rng.uniform(0, self.args.dwell))
        self.check_loads()
        self.kills.append(time.monotonic())
        stop_s, code = self.agent.halt(sig)
        t_down = time.monotonic()
        rec: dict[str, Any] = {"restart": i + 1, "signal": sig.name, "exit_s": round(stop_s, 3),
                               "exit_status": code}
        victim = self.churn.pop(0)
        self.pods.delete(victim)
        rec["deleted"] = victim.name
        new = self.pods.sandbox(f"pod-{i + 1:03d}")
        rec["added"] = new.name
        rec["add_while_down"] = self.pods.refused_cleanly(new)
        rec["down_s"] = round(time.monotonic() - t_down, 3)
        t0 = self.agent.start(st)
        k = self.args.crash_start_every
        if k and (i + 1) % k == 0:  # a crash while starting (adopting): start once more
            wait = self.rng.uniform(0, CRASH_START_MAX_S)
            time.sleep(wait)
            _, code = self.agent.halt(signal.SIGKILL)
            rec["killed_while_starting"] = {"after_s": round(wait, 3), "exit_status": code}
            t0 = self.agent.start(st)
        served, attempts = 0.0, 0  # 0 attempts: ADD worked with no agent (recorded above)
        if new.name not in self.pods.live:
            served, attempts = self.add_when_served(new, t0)
        rec.update(cni_serve_s=round(served, 3), add_attempts=attempts)
        self.churn.append(new)
        reach = self.reach(new)
        rec["new_pod_reaches"] = reach["ok"]
        if not reach["ok"]:
            self.new_pod_failures.append({"restart": i + 1, "pod": new.name, **reach})
        return rec

    def check_loads(self) -> None:
        """A server or short-connection loop that ended is a broken soak: stop.
        A long transfer that ended early broke its connection: that is
        counted at the end (and noted here, with the restart it happened in)."""
        for name, ld in self.loads.items():
            if ld.proc.poll() is None:
                continue
            if name.startswith("stream-"):
                if name not in self.streams_ended:
                    self.streams_ended[name] = len(self.kills)
                    self.ctx.progress(f"{name} ENDED during restart {len(self.kills)}: "
                                      f"{ld.events[-1:]}")
                continue
            raise RuntimeError(f"{name} ended early (exit {ld.proc.returncode}): "
                               f"{ld.events[-3:]}")

    def moment(self, t: float) -> str:
        """`t` (monotonic) as "restart K +S s" (seconds after its signal) or "before"."""
        k = self.restart_of(t)
        return f"restart {k} +{t - self.kills[k - 1]:.2f} s" if k else "before the first restart"

    def restart_of(self, t: float) -> int:
        """The restart a moment belongs to: 0 before the first signal, else k
        from restart k's signal to the next one's."""
        return bisect.bisect_right(self.kills, t)

    def run(self, st: ExitStack) -> None:
        self.setup(st)
        n = self.args.restarts
        for i in range(n):
            rec = self.restart(i, st)
            self.restarts.append(rec)
            fails = sum(len(self.loads[p].of("fail")) for p in ("short-clusterip",
                                                                "short-masquerade"))
            down = rec["add_while_down"]
            crash = (f", its successor killed {rec['killed_while_starting']['after_s']:.2f} s "
                     "after its start" if "killed_while_starting" in rec else "")
            self.ctx.progress(
                f"restart {i + 1}/{n} {rec['signal']}: exited in {rec['exit_s']:.2f} s "
                f"(status {rec['exit_status']}){crash}; "
                f"deleted {rec['deleted']}; ADD while down "
                f"{'refused cleanly' if down.get('clean') else 'NOT refused cleanly: ' + str(down.get('problem'))}"
                f"; CNI served {rec['cni_serve_s']:.2f} s after the start "
                f"({rec['add_attempts']} attempts); {rec['added']} "
                f"{'reaches' if rec['new_pod_reaches'] else 'CANNOT reach'} {VIP} and "
                f"{EXTERNAL_IP}; short connections failed so far: {fails}")
        time.sleep(2.0)  # the last restart's traffic, then the accounting
        self.check_loads()

    # -------------------------------------------------------------- the end
    def finish(self) -> tuple[list[Result], list[str]]:
        """Stop the traffic, account for it, check the node's consistency."""
        shorts = {}
        for name in ("short-clusterip", "short-masquerade"):
            ld = self.loads[name]
            ld.stop()
            summary = (ld.of("summary") or [{}])[-1]
            fails = ld.of("fail")
            by_restart: dict[int, int] = {}
            for f in fails:
                k = self.restart_of(f["t"])
                by_restart[k] = by_restart.get(k, 0) + 1
            shorts[name] = {"attempted": summary.get("attempted"), "ok": summary.get("ok"),
                            "failed": summary.get("failed", len(fails)),
                            "unfinished": summary.get("unfinished"),
                            "slow": summary.get("slow"), "max_ms": summary.get("max_ms"),
                            "errors": summary.get("errors"),
                            "failures_by_restart": by_restart,
                            "first_failures": fails[:5]}
        streams = {}
        for name in ("stream-clusterip", "stream-masquerade"):
            ld = self.loads[name]
            ld.stop(timeout=90)
            res = (ld.of("result") or [{"ok": False, "sent": 0,
                                        "error": f"no result (exit {ld.proc.returncode})"}])[-1]
            sink = self.loads["backend-sink" if "clusterip" in name else "ext-sink"]
            ends = sink.of("done") + sink.of("error")
            sent = int(res.get("sent") or 0)
            intact = bool(res.get("intact"))
            if "intact" in res:  # the sink answered: what arrived, and was it intact
                received = int(res.get("received") or 0)
                lost = sent - received if intact else sent
            else:  # the connection broke: what the sink had counted by then
                received = int(ends[-1].get("bytes", 0)) if ends else 0
                lost = sent - received
            gap_from = res.get("sink_max_gap_from", ends[-1].get("max_gap_from") if ends else None)
            gap_in = self.restart_of(gap_from) if gap_from else None
            streams[name] = {"ok": bool(res.get("ok")), "sent": sent, "received": received,
                             "retransmissions": res.get("retransmissions"),
                             "spurious_retransmissions": res.get("spurious_retransmissions"),
                             "reorderings": res.get("reorderings"),
                             "retransmitted_at": [self.moment(e["t"]) for e in ld.of("retrans")],
                             "sink_max_gap_in_restart": gap_in,
                             "sink_max_gap_after_signal_s":
                                 round(gap_from - self.kills[gap_in - 1], 3) if gap_in else None,
                             "intact": intact, "bytes_lost": max(0, lost),
                             "seconds": res.get("seconds"), "error": res.get("error"),
                             "sink_max_gap_ms": res.get("sink_max_gap_ms",
                                                        ends[-1].get("max_gap_ms") if ends
                                                        else None),
                             "sink_end": ends[-1] if ends else None,
                             "ended_early_in_restart": self.streams_ended.get(name)}
        for name in ("backend-sink", "backend-rr", "ext-sink", "ext-rr"):
            self.loads[name].stop()
        after = self.drops()
        drops = {cube: delta for cube, reasons in after.items()
                 if (delta := {r: n - self.drops_before.get(cube, {}).get(r, 0)
                               for r, n in reasons.items()
                               if n > self.drops_before.get(cube, {}).get(r, 0)})}
        problems = self.consistency()
        return self.results(shorts, streams, problems, drops), problems

    def consistency(self) -> list[str]:
        """The agent's pods (status ConfigMap), the node's pod links and host-local's
        reservations must be exactly the live pods."""
        live = self.pods.live
        want_names = {f"{NAMESPACE}/{n}" for n in live}
        want_links = {host_ifname(sb.container_id) for sb in live.values()}
        want_ips = {sb.ip: sb.container_id for sb in live.values()}
        deadline = time.monotonic() + CONSISTENT_TIMEOUT_S
        while True:
            problems = []
            try:
                cm = get(self.agent.api, "ConfigMap", f"pcn-agent-status-{self.agent.node}",
                         "pcn-system")
                status = json.loads(cm["data"]["status.json"])
                have = set(status.get("pods", {}))
                if have != want_names:
                    problems.append(f"the agent reports pods {sorted(have - want_names)} that "
                                    f"are gone and lacks {sorted(want_names - have)}")
            except (ApiServerError, KeyError, ValueError) as exc:
                problems.append(f"no status from the agent: {exc}")
            node_links = {n for n in links(self.agent.node) if POD_LINK.fullmatch(n)}
            if node_links != want_links:
                problems.append(f"pod links in the node: {sorted(node_links - want_links)} of "
                                f"no pod, {sorted(want_links - node_links)} missing")
            if self.pods.reservations() != want_ips:
                problems.append(f"host-local reserves {self.pods.reservations()}, the live pods "
                                f"have {want_ips}")
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.5)

    def agent_log_problems(self) -> dict[str, Any]:
        """ERROR lines and tracebacks in the agent's log (all its starts)."""
        text = self.agent.log_path.read_text(errors="replace").splitlines()
        errors = [x for x in text if " ERROR " in x or " CRITICAL " in x]
        return {"error_lines": len(errors), "tracebacks": sum("Traceback" in x for x in text),
                "first_errors": errors[:5]}

    def results(self, shorts: dict[str, Any], streams: dict[str, Any], problems: list[str],
                drops: dict[str, dict[str, int]]) -> list[Result]:
        serve = [r["cni_serve_s"] for r in self.restarts if r["add_attempts"]]
        stream_fail = sum(1 for s in streams.values() if not s["ok"])
        short_fail = sum(int(s["failed"] or 0) for s in shorts.values())
        refused_badly = [r for r in self.restarts if not r["add_while_down"].get("clean")]
        failed = short_fail + stream_fail + len(self.new_pod_failures)
        lost = sum(s["bytes_lost"] for s in streams.values())
        common = {"date": now_iso(), "restarts": len(self.restarts),
                  "agent": "pcn-agent subprocess, kmock EmulatedApiServer, one-node lab"}
        attempted = sum(int(s["attempted"] or 0) for s in shorts.values())
        return [
            Result(SCENARIO, "pcn", "connections-failed", failed, "connections",
                   {"target": 0, "short": shorts, "short_attempted": attempted,
                    "short_failed": short_fail, "long_transfers_failed": stream_fail,
                    "new_pod_checks_failed": self.new_pod_failures,
                    "slow": sum(int(s["slow"] or 0) for s in shorts.values()),
                    "dataplane_drops": drops, **common,
                    "what": "short request/response connections through the ClusterIP and "
                            "through masquerading that failed, + long transfers not completed "
                            "on their one connection, + new pods' first exchanges that failed"}),
            Result(SCENARIO, "pcn", "bytes-lost", lost, "bytes",
                   {"target": 0, "streams": streams, **common,
                    "what": "bytes the long transfers sent that did not arrive (all of them "
                            "when what arrived was not intact)"}),
            Result(SCENARIO, "pcn", "cni-serve-max", max(serve) if serve else 0.0, "s",
                   {"target_s": results.SOAK_CNI_SERVE_TARGET_S, "samples_s": serve,
                    "cold_start_s": round(self.cold_serve_s, 3), **common,
                    "what": "agent process started again -> end of the first CNI ADD that "
                            "succeeded (ADD once the local API says ready), per restart"}),
            Result(SCENARIO, "pcn", "cni-serve-p50", statistics.median(serve) if serve else 0.0,
                   "s", {"stat": "median", **common}),
            Result(SCENARIO, "pcn", "restarts", len(self.restarts), "restarts",
                   {"per_restart": self.restarts, "add_while_down_not_clean": len(refused_badly),
                    "inconsistencies": problems, "agent_log": self.agent_log_problems(),
                    **common}),
        ]


def soak(ctx: Context, args: argparse.Namespace, keep_log: Path) -> tuple[list[Result],
                                                                          list[str]]:
    with ExitStack() as st:
        agent = AgentProcess(ctx, st, "soak")
        st.callback(lambda: shutil.copyfile(agent.log_path, keep_log)
                    if agent.log_path.exists() else None)
        s = Soak(ctx, args, agent, Pods(ctx, agent), random.Random(args.seed))
        s.run(st)
        agent.check_alive()
        return s.finish()


def summary(measured: list[Result]) -> str:
    """Where failures came from: per path, and the data plane's drops."""
    failed = next(r for r in measured if r.metric == "connections-failed")
    lines = []
    for name, s in failed.extra["short"].items():
        by = s["failures_by_restart"]
        first = f", the first in restart {min(by)}" if by else ""
        errors = f" {s['errors']}" if s["errors"] else ""
        lines.append(f"{name}: {s['failed']} of {s['attempted']} failed{first}{errors}; "
                     f"{s['slow']} slower than 500 ms, slowest {s['max_ms'] or 0:.0f} ms")
    for name, s in next(r for r in measured if r.metric == "bytes-lost").extra["streams"].items():
        where = (f" (in restart {s['sink_max_gap_in_restart']}, "
                 f"{s['sink_max_gap_after_signal_s']:.2f} s after its signal)"
                 if s["sink_max_gap_in_restart"] else "")
        lines.append(f"{name}: {s['sent']} B sent, {s['received']} B received "
                     f"{'intact' if s['intact'] else 'NOT intact'} on one connection"
                     f"{', ' + s['error'] if s['error'] else ''}; "
                     f"{s['retransmissions']} segments retransmitted "
                     f"({s['spurious_retransmissions']} spurious: the receiver had them; "
                     f"{', '.join(s['retransmitted_at']) or 'none'}); longest pause between "
                     f"arrivals {s['sink_max_gap_ms'] or 0:.0f} ms{where}")
    if failed.extra["new_pod_checks_failed"]:
        lines.append(f"new pods that could not reach the Service and the external host at "
                     f"once: {len(failed.extra['new_pod_checks_failed'])}")
    agent_log = next(r for r in measured if r.metric == "restarts").extra["agent_log"]
    lines.append(f"agent log: {agent_log['error_lines']} ERROR lines, "
                 f"{agent_log['tracebacks']} tracebacks"
                 + "".join(f"\n  {x}" for x in agent_log["first_errors"]))
    drops = failed.extra["dataplane_drops"]
    lines.append("data-plane drops during the soak: " + ("; ".join(
        f"{cube}: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
        for cube, reasons in sorted(drops.items())) or "none"))
    return "\n".join(lines)


# ------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--restarts", type=int, default=100,
                   help="agent restarts, alternating SIGTERM and SIGKILL (default 100)")
    p.add_argument("--rate", type=float, default=20.0,
                   help="short connections per second through the ClusterIP, and as many "
                        "through masquerading (default 20)")
    p.add_argument("--stream-rate", type=int, default=256 * 1024,
                   help="bytes per second of each long transfer (default 262144)")
    p.add_argument("--dwell", type=float, default=2.0,
                   help="longest random wait from an agent serving CNI to the next signal, "
                        "seconds (default 2)")
    p.add_argument("--churn-pods", type=int, default=3,
                   help="pods besides the backend and the client; one is deleted and one "
                        "added at every restart (default 3)")
    p.add_argument("--crash-start-every", type=int, default=4, metavar="K",
                   help="every K-th restart, the new agent is also killed (SIGKILL) at a random "
                        f"moment of its first {CRASH_START_MAX_S:g} s (starting, adopting) and "
                        "started once more; CNI serve time counts from that last start "
                        "(default 4; 0: never)")
    p.add_argument("--seed", type=int, default=9, help="random seed of the waits (default 9)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help=f"results file to merge into (default {DEFAULT_OUTPUT})")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    args = p.parse_args(argv)
    if args.restarts < 1 or args.rate <= 0 or args.stream_rate < 1 or args.dwell < 0 \
            or args.churn_pods < 1 or args.crash_start_every < 0:
        p.error("--restarts, --rate, --stream-rate and --churn-pods must be positive, "
                "--dwell not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    preflight()
    prefix = netns.new_run_prefix()
    busy = cpu_busy()
    ctx = Context(nss=netns.Namespaces(prefix), tmp=Path(tempfile.gettempdir()) / prefix,
                  duration=0.0, runs=0, pod_adds=0, pinning=iperf.Pinning())
    keep_log = Path(tempfile.gettempdir()) / f"{prefix}-soak-agent.log"
    ctx.progress(f"run {prefix}: {SCENARIO}, {args.restarts} restarts")
    measured: list[Result] = []
    problems: list[str] = []

    def body() -> None:
        got, bad = soak(ctx, args, keep_log)
        measured.extend(got)
        problems.extend(bad)

    failure, left = run_guarded(ctx, prefix, body)
    prefixes = [prefix, *(lab.prefix for lab in ctx.labs)]
    status = 0
    if measured:
        print(results.table(measured))
        lines = results.acceptance(measured)
        for line in lines:
            print(line)
        if any(line.endswith("FAIL") for line in lines):
            status = 1
        for p in problems:
            print(f"INCONSISTENT at the end: {p}")
            status = 1
        print(summary(measured))
        busy_after = cpu_busy()
        meta = {**results.machine_metadata(), "run": prefix, "restarts": args.restarts,
                "short_connections_per_s": args.rate, "stream_bytes_per_s": args.stream_rate,
                "dwell_s": args.dwell, "churn_pods": args.churn_pods, "seed": args.seed,
                "cpu_busy_before_pct": round(busy, 1), "cpu_busy_after_pct": round(busy_after, 1)}
        for r in measured:
            r.extra["run"] = prefix
        results.merge_write(args.output, measured, [SCENARIO], meta)
        print(f"\nresults merged into {args.output}", file=sys.stderr)
    if keep_log.exists():
        print(f"the agent's log (every start): {keep_log}", file=sys.stderr)
    return finish(status, failure, left, prefixes, "soak")


if __name__ == "__main__":
    sys.exit(main())
