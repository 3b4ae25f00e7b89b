"""The control plane's speed, with the real agent against a real API server.

Each scenario builds a one-node lab without a data plane (namespaces and the
physical network only), an API server holding the Node, and runs the real
`pcn-agent` as a subprocess, as pcn-lab and a DaemonSet do: NODE_NAME,
PCN_NETNS (the node namespace), its API server (PCN_KUBE_URL or a
kubeconfig), PCN_SOCKET, PCN_CONFIG, PCN_STATE_DIR, metrics and liveness
off. The agent builds the node's data plane itself. What the data plane
carries is read by this process from the agent's pinned lb_services and
lb_slots maps (bench.bpfmaps, bpf syscalls): exactly what the lbrp program
looks up, whatever the agent believes.

The API server of endpoints-to-dataplane and agent-cold-start is the real
one: etcd + kube-apiserver from `make k8s`'s cache (/var/cache/pcn/k8s),
started by bench.kubeproxy.ControlPlane in a namespace of their own and
reached through a relay on this namespace's loopback (`RealKube`), with the
namespaces and the CRDs the agent watches (crds/ and network-policy-api's
ClusterNetworkPolicy from the Go module cache); the agent reads a
kubeconfig with the bench's token. Without that cache they fall back to
kmock's emulator (`EmulatedKube`) and say so in their results ("note").
cni-add and bench.soak use the emulator.

Scenarios:
* `endpoints-to-dataplane`: `--endpoint-services` Services (10 000) with an
  EndpointSlice each of `--endpoints-per-service` ready endpoints (5: 50 000
  endpoints) are created through the API before the agent starts (the time
  that takes is reported as populate_s, apart); once the agent has all of
  them in its maps and has settled (its CPU use under 0.2 of a CPU over a
  second: it compiles its function cubes ahead of need after its first
  pass; settled_s), N times the EndpointSlice of one of them (svc-05000)
  gets a different set of one or two endpoints (a merge PATCH, as a
  controller writes it). Each sample is the time from just before the
  PATCH is sent to the first poll (every 0.5 ms) of the pinned maps that
  shows that service's slot table holding exactly the new backends.
  20-80 ms pause between changes, so each is an update of its own.
* `agent-cold-start`: `--cold-services` Services (10 000) with their
  EndpointSlices (5 endpoints each) are in the API before the agent starts.
  Time from starting the agent process to the first poll (every 50 ms) at
  which every one of them is in the pinned maps with its backends. Also
  reported: when the data plane was up (the agent's local API socket
  appears right after it), and the time from then to all services
  realised.
* `cni-add`: N pods added by the real plugin, run as the kubelet stand-in
  runs it (pcn_lab.kubelet.run_cni: `ip netns exec <node> .venv/lib/pcn-cni/pcn`,
  pcn-cni's C launcher, which the image installs as /opt/cni/bin/pcn: it
  hands the invocation to the agent, which runs the plugin's code in-process,
  pcn_agent.control.localapi.CniService; PCN_CNI_PLUGIN=python runs the
  Python plugin on its own instead, `python -I -S .../pcn_agent/cni/__main__.py`;
  CNI_* environment, configuration on stdin, host-local IPAM) against the
  agent's local API, one at a time; each sample is one run_cni ADD call.
  The pod namespaces are made outside the timing, as a runtime makes the
  sandbox before calling CNI; timing starts once the agent is idle (under 10%
  of a CPU over a second: its background compiles of function cube types
  are done), pods being added to a settled node. With PCN_CNI_TRACE the
  plugin (or the agent, for the launcher) marks the end of each phase on
  time.monotonic() and the agent reports its lock wait and op time; the
  p50/p99 of each phase (CNI_PHASES) are in the results' extra. Each pcn ADD
  is followed by one of the
  reference, variant `linux-bridge`: the CNI project's `bridge` plugin (Go,
  the same host-local IPAM) on a node namespace of its own, run the same way,
  so that pcn's times can be read as ratios within the run.
* `cni-add-parallel`: as `cni-add`, but 30 (--cni-parallel) ADDs started
  together on one node (threads released by a barrier, after one ADD alone),
  then 30 of the reference; each sample is one ADD's wall time,
  `latency-total` the first start to the last end.

Where an ADD's time goes (ms, p50 of 30 serial ADDs, PCN_CNI_TRACE phases, in a
one-node lab like tests/test_cni.py's: the local API served in-process by
DataplaneHandler, no reconcile loop; before and after back to back on the
same machine at load ~3 on 2 CPUs, 2026-12-01 09:03 UTC; before = the plugin
and handler of ad6d20c, the plugin started by the `pcn-cni` console script,
marks added by wrapping its functions):

    phase     before  after  what changed
    start       15.4    6.3  -I -S entry (no site: .pth files, editable-install hook)
    imports     14.0    7.9  no dataclasses, typing, socket, subprocess; ctypes lazily
    ipam         5.7    3.0  no VERSION exec before every command (asked only on refusal)
    link         1.4    2.4  (ctypes' import now lands here)
    agent        6.2    3.9  one state save per op, compact JSON, one op thread
    exit         7.0    0.9  os._exit after flushing: no interpreter teardown
    total       50.5   24.6  (p99 64.3 -> 33.4); CPU per ADD 42.3 -> 20.7 ms in
                             processes (plugin, ip netns exec, host-local) + 6.3 -> 4.2
                             in the agent

With 30 at once the ADDs are CPU-bound: ~25 ms of CPU each on 2 cores is
~375 ms before anything waits; the floor of a Python process per ADD is its
interpreter start (~6 ms CPU with -I -S) plus json/re/enum (~3.5 ms).

The C launcher (issue 13 item 5) removes the interpreter start, the imports
and the exit (~15 ms of CPU per ADD) from every ADD: the agent, running and
warm, does the rest on a thread of its own. `make bench BENCH_ARGS="--only
cni-add,cni-add-parallel"` on 2 CPUs shared with other work, 2026-12-01;
p50/p99 ms, and pcn / the `bridge` plugin of the same run:

    run (UTC)  plugin, agent                 cni-add                 cni-add-parallel
    11:50      Python, before (e5cf1b0)      31/74  (2.36x/2.41x)    1235/1392 (3.96x/3.92x)
    12:32      Python (PCN_CNI_PLUGIN), now  24/48  (2.68x/3.33x)     512/566  (4.10x/3.35x)
    12:33      launcher, now                 13/49  (1.20x/3.04x)     197/288  (1.29x/1.57x)

(the serial p99s are one or two spikes of a shared machine: the bridge
plugin's own p99 moved between 14 and 106 ms over the day's runs). With 30 at
once the Python plugin's phases were start 174, imports 304, link 462 ms (30
interpreters on 2 CPUs); with the launcher the agent's work for them shares
one interpreter lock, so the agent runs 2 per CPU at once
(CniService.concurrency; 30 at a time, back to back with 4 and 8: p99
516/410 ms against 297/379 and 304/391) and the others wait for their turn
(the phase `imports`, ~120 ms p50 at 30), and it reconciles once after the
burst instead of after each attach (each full reconcile held the node lock
the next attach needed). What was left per ADD was CPU on 2 cores: `ip netns
exec` and the launcher (~3 ms), host-local (~3 ms), the netlink work (~1-2
ms) and the attach (~4 ms, most of it pyroute2 building the tc filters).

Then (issue 13 item 5, 30 at once p99 < 250 ms), py-spy on the agent during
30 ADDs at once (PCN_BENCH_AGENT_PROFILE, samples of the ADDs' threads) put
a third of them in pyroute2 (0.9's sync IPRoute runs an event loop and
decodes every attribute per call: two link lookups, a get_links, a clsact
add and a filter replace per attach), an eighth in the full state save after
every attach, and a fifth of what remained in the disable_ipv6 writes (the
kernel restarts them while anyone holds the rtnl lock). Now: the attach's
link lookup and tc work go through a lean rtnetlink socket
(pcn_agent.dataplane.rtnl; one RTM_GETLINK gives index, kind and peer
namespace), the saves are a group commit (DataplaneHandler: an op is
answered once a save that began after it is done; one save covers the ops
queued meanwhile; phase agent-save), a port's two hooks are one map write,
and the pod's veth end is born with IPv6 off (its namespace's default,
written without the lock). `make bench BENCH_ARGS="--only
cni-add,cni-add-parallel"` (the launcher), 2026-12-01 16:11-16:14 UTC on 2
CPUs at load 1.3-2.0, before (107e030) and after interleaved; p50/p99 ms,
all 30 in ms, and the `bridge` plugin's of the same run:

    run      cni-add pcn  bridge    30 at once pcn    all   bridge         all
    after     12/17       13/24     156/233           234   201/235        237
    before    16/49       14/36     204/307           310   157/198        199
    after     10/16       10/14     133/204           204   177/221        223
    before    15/64       12/17     191/277           280   160/210        211
    after     11/19       11/18     134/203           205   173/203        205

The agent's part of an ADD one at a time went from 4.5-5.5 ms (op 4.4-5.3)
to 1.6-2.0 (op 0.6-0.8, save 0.8-1.0); with 30 at once the wait for a turn
(phase imports) from 109-137 ms p50 to 56-68.

On teardown the agent is stopped (SIGTERM), its pins and state removed, the
pods deleted with CNI DEL, and the namespaces removed.

PCN_BENCH_AGENT_PROFILE=FILE samples the agent with py-spy into FILE.<tag>
(endpoints-to-dataplane: during the changes only); `python -m
bench.controlplane --top FILE.ep` lists where its time went.

kmock's emulator records every request it serves and matches each new one
against the whole record, so its requests get slower the more it has served
(~0.15 ms more per request served: 44 ms per create after 300). A real API
server does not; the bench keeps only the last REQUEST_LOG_KEEP records
(EmulatedApiServer's keep_requests) so that the agent is measured rather than the
emulator's bookkeeping (then ~2-5 ms per request on this machine). A request
is matched right after it is recorded, so the record must stay longer than
the requests in flight at once (a few watches, a few writes).
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import logging
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from pcn_agent.dataplane import bpffs
from pcn_lab import kubelet
from pcn_lab.apiserver import EmulatedApiServer, apply, object_path
from pcn_lab.topology import Lab

from . import kubeproxy
from .bpfmaps import ServiceMaps
from .netns import exec_in, stop
from .references import LinuxBridgeCNI
from .results import Result, now_iso
from .rr import percentile
from .scenarios import MTU, Context

log = logging.getLogger(__name__)

ENDPOINTS = "endpoints-to-dataplane"
COLD_START = "agent-cold-start"
CNI_ADD = "cni-add"
CNI_ADD_PARALLEL = "cni-add-parallel"
NAMESPACE = "bench"
SERVICE_PORT, TARGET_PORT = 80, 8080
POLL_S = 0.0005  # endpoints-to-dataplane: map polling period
COLD_POLL_S = 0.05  # agent-cold-start, and waiting for all Services (a poll walks lb_services)
CHANGE_TIMEOUT_S = 30.0
IDLE_CPU, IDLE_MAX_S = 0.2, 90.0  # wait_idle: CPU seconds per second, longest wait
READY_TIMEOUT_S = 300.0  # the agent compiles its cubes on a shared 2-CPU machine
REQUEST_LOG_KEEP = 16
STATUS_NAMESPACE = "pcn-system"  # the agent's status ConfigMap (PCN_NAMESPACE)
CRD_DIR = Path(__file__).resolve().parents[1] / "crds"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


class EmulatedKube:
    """kmock's EmulatedApiServer on loopback, in a thread of this process."""

    real = False
    what = "kmock EmulatedApiServer"

    def __init__(self, st: ExitStack) -> None:
        self.server = EmulatedApiServer(keep_requests=REQUEST_LOG_KEEP).start()
        st.callback(self.server.stop)
        self.note = ""

    @property
    def url(self) -> str:
        return self.server.url

    def agent_env(self, directory: Path) -> dict[str, str]:
        return {"PCN_KUBE_URL": self.server.url}

    def create(self, obj: dict[str, Any]) -> None:
        apply(self.server, obj)

    def create_all(self, objs: list[dict[str, Any]], workers: int = 4) -> float:
        """POST `objs` with `workers` threads; the seconds it took."""
        t = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda o: self.server.request("POST", object_path(o, False), o), objs))
        return time.monotonic() - t

    def merge_patch(self, obj: dict[str, Any], body: dict[str, Any]) -> None:
        self.server.request("PATCH", object_path(obj), body, "application/merge-patch+json")


class RealKube:
    """A bench-owned etcd + kube-apiserver from `make k8s`'s cache
    (bench.kubeproxy.ControlPlane: their own namespace, a relay from this
    namespace's loopback), with the namespaces and the CRDs the agent
    watches (crds/pcn.dev_*.yaml and network-policy-api's
    ClusterNetworkPolicy from the Go module cache, when there)."""

    real = True

    def __init__(self, ctx: Context, st: ExitStack, tag: str) -> None:
        bins = kubeproxy.bin_dir()
        api_ns = ctx.nss.create(f"{tag}api")
        st.callback(ctx.nss.remove, api_ns)
        self.control = kubeproxy.ControlPlane(api_ns, ctx.tmp / f"kube-{tag}", bins)
        st.callback(self.control.close)
        t = time.monotonic()
        self.client = self.control.start()
        for ns in (NAMESPACE, STATUS_NAMESPACE):
            self.client.create({"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": ns}})
        crds = install_crds(self.client)
        self.note = ""
        self.what = f"kube-apiserver ({kubeproxy.version(bins).replace('Kubernetes ', '')})"
        ctx.progress(f"kube-apiserver (etcd, {bins}) up in {api_ns} with {len(crds)} CRDs in "
                     f"{time.monotonic() - t:.1f} s")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.client.port}"

    def agent_env(self, directory: Path) -> dict[str, str]:
        """The agent finds the API through a kubeconfig (the bench token, the
        self-signed certificate not verified: loopback only)."""
        kc = directory / "kubeconfig"
        kc.write_text(json.dumps(kubeproxy.kubeconfig(self.url)))
        return {"KUBECONFIG": str(kc)}

    def create(self, obj: dict[str, Any]) -> None:
        self.client.create(obj)

    def create_all(self, objs: list[dict[str, Any]], workers: int = 8) -> float:
        return self.client.create_all(objs, workers)

    def merge_patch(self, obj: dict[str, Any], body: dict[str, Any]) -> None:
        self.client.request("PATCH", object_path(obj), body, "application/merge-patch+json")


Kube = EmulatedKube | RealKube


def kube_for(ctx: Context, st: ExitStack, tag: str) -> Kube:
    """The real API server when `make k8s`'s binaries are there, else the
    emulator, with a note saying so (the scenario's figures then measure
    the emulator's bookkeeping as much as the agent, see the module text)."""
    missing = kubeproxy.binaries_missing()
    if not missing:
        return RealKube(ctx, st, tag)
    kube = EmulatedKube(st)
    kube.note = (f"{kubeproxy.bin_dir()} lacks {', '.join(missing)} (run `make k8s`): "
                 "measured against kmock's emulator, which slows down with many objects")
    ctx.progress(f"NOTE: {kube.note}")
    return kube


def install_crds(client: kubeproxy.ApiClient, timeout: float = 60) -> list[str]:
    """Create the CustomResourceDefinitions the agent watches and wait until
    the API server serves them (condition Established, as `kubectl wait
    --for condition=established` does); their names."""
    files = sorted(CRD_DIR.glob("pcn.dev_*.yaml"))
    try:
        from pcn_lab.cluster import artifacts, policyapi

        npa = policyapi.module_dir(artifacts.go_mod_cache()) / "config" / "crd" / "standard"
        files += sorted(npa.glob("policy.networking.k8s.io_*.yaml"))
    except (OSError, ValueError) as exc:  # the agent then warns that it cannot watch them
        log.warning("no network-policy-api CRDs for the bench API server: %s", exc)
    names = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                client.request("POST", CRD_PATH, doc)
                names.append(doc["metadata"]["name"])
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            conds = (client.request("GET", f"{CRD_PATH}/{name}").get("status") or {}) \
                .get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conds):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {name} not established after {timeout:.0f} s")
            time.sleep(0.1)
    return names


class AgentProcess:
    """A one-node lab (no data plane), an API server (`kube`: the emulator
    unless given) with the Node, and the real pcn-agent for that node as a
    subprocess. `api` is the emulator itself (pcn_lab.apiserver's helpers
    take it), None with a real API server."""

    def __init__(self, ctx: Context, st: ExitStack, tag: str, kube: Kube | None = None) -> None:
        self.ctx = ctx
        self.tag = tag
        self.lab = Lab(nodes_count=1, pods_per_node=0, dataplane=False)
        ctx.labs.append(self.lab)  # its prefix and pins are checked for leftovers
        self.lab.build()
        st.callback(self.lab.close)
        self.kube: Kube = kube if kube is not None else EmulatedKube(st)
        self.api: EmulatedApiServer | None = \
            self.kube.server if isinstance(self.kube, EmulatedKube) else None
        self.node = self.lab.node_name(1)
        self.dir = ctx.tmp / f"agent-{tag}"
        self.dir.mkdir()
        self.socket = self.dir / "agent.sock"
        self.state_dir = self.dir / "state"
        self.pin_dir = self.lab.pin_root / self.node
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.profiler: subprocess.Popen[bytes] | None = None
        self._stop_registered = False
        self.kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node},
                          "spec": {"podCIDR": self.lab.pod_cidr(1)},
                          "status": {"addresses": [{"type": "InternalIP",
                                                    "address": self.lab.node_ip(1)}]}})
        ctx.progress(f"lab {self.lab.prefix}: node namespace {self.node}, API {self.kube.url} "
                     f"({self.kube.what})")

    @property
    def pod_cidr(self) -> str:
        return self.lab.pod_cidr(1)

    @property
    def gateway(self) -> str:
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address + 1)

    def start(self, st: ExitStack, profile: bool = True) -> float:
        """Start the agent (again, after halt()); returns time.monotonic() just
        before the start. `st` stops it and removes its pins and state at the
        end. `profile`: sample it from the start (see _profile), else only
        from start_profile()."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"pcn-agent of {self.node} is already running")
        settings = self.dir / "config.json"
        settings.write_text(json.dumps({"podCIDR": "10.244.0.0/16", "mtu": str(MTU)}))
        exe = Path(sys.executable).parent / "pcn-agent"
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "pcn_agent.control.cli"]
        env = {k: v for k, v in os.environ.items() if k not in ("PCN_KUBE_URL", "KUBECONFIG")}
        env = {**env, **self.kube.agent_env(self.dir), "NODE_NAME": self.node,
               "PCN_NETNS": self.node, "PCN_SOCKET": str(self.socket),
               "PCN_CONFIG": str(settings), "PCN_METRICS_PORT": "0", "PCN_LIVENESS": "",
               "PCN_STATE_DIR": str(self.state_dir), "PCN_BPF_ROOT": str(self.lab.pin_root),
               "PCN_NAMESPACE": STATUS_NAMESPACE}
        with open(self.log_path, "ab") as logf:
            t = time.monotonic()
            self.proc = subprocess.Popen(argv, env=env, stdout=logf, stderr=logf,
                                         stdin=subprocess.DEVNULL)
        if not self._stop_registered:
            st.callback(self.stop)
            self._stop_registered = True
        if profile:
            self.start_profile()
        return t

    def halt(self, sig: signal.Signals, timeout: float = 60.0) -> tuple[float, int]:
        """Stop the agent with `sig` (SIGTERM: kopf's orderly shutdown; SIGKILL:
        a crash) and wait until it has exited, leaving its data plane, pins and
        state for the next start to adopt. Returns (seconds from the signal to
        the exit, exit status as Popen gives it: -9 for SIGKILL). A process still
        alive after `timeout` is killed and RuntimeError raised."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"pcn-agent of {self.node} is not running; its log ends:\n"
                               f"{self.log_tail()}")
        if self.profiler is not None:
            self._stop_profiler()
        t = time.monotonic()
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"pcn-agent still running {timeout:.0f} s after {sig.name}; "
                               f"killed. Its log ends:\n{self.log_tail()}") from None
        return time.monotonic() - t, code

    def start_profile(self) -> None:
        """PCN_BENCH_AGENT_PROFILE=FILE: sample the agent (every thread) with py-spy
        (pip install py-spy) into FILE.<agent tag> (ep, cold, cni, soak), collapsed
        stacks, until the agent stops; `python -m bench.controlplane --top FILE.ep`
        lists the functions that took the most samples."""
        out = os.environ.get("PCN_BENCH_AGENT_PROFILE")
        if not out or self.proc is None or self.profiler is not None:
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        # --nonblocking: pausing the agent would interrupt its BPF program loads (EAGAIN)
        self.profiler = subprocess.Popen([spy, "record", "--pid", str(self.proc.pid),
                                          "--nonblocking", "--rate", "200", "--format", "raw",
                                          "--output", f"{out}.{self.tag}"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _stop_profiler(self) -> None:
        assert self.profiler is not None
        self.profiler.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        try:
            self.profiler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.profiler.kill()
            self.profiler.wait()
        self.profiler = None

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"pcn-agent exited with {self.proc.returncode}; its log ends:\n"
                               f"{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> ServiceMaps:
        """Until the data plane is up (local API socket, pinned service maps)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.socket.exists() and ServiceMaps.exist(self.pin_dir):
                return ServiceMaps(self.pin_dir)
            time.sleep(0.05)
        raise RuntimeError(f"pcn-agent's data plane not up after {timeout:.0f} s; its log "
                           f"ends:\n{self.log_tail()}")

    def wait_idle(self, window_s: float = 1.0, busy_pct: float = 10.0,
                  timeout: float = READY_TIMEOUT_S, strict: bool = True) -> float:
        """Until the agent used less than `busy_pct` of one CPU over `window_s`
        (its user+system time in /proc/<pid>/stat): once the data plane is up
        it still compiles the function cube types in the background
        (DataplaneManager.warm_up), seconds of CPU that a scenario timing
        pod operations on a settled node must not share. Returns the seconds
        waited; after `timeout`, RuntimeError (`strict`) or the seconds waited
        (the scenario measures anyway, saying how long it waited)."""
        assert self.proc is not None
        tick = os.sysconf("SC_CLK_TCK")
        stat = Path(f"/proc/{self.proc.pid}/stat")

        def cpu_s() -> float:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.check_alive()
            before = cpu_s()
            time.sleep(window_s)
            if (cpu_s() - before) / window_s * 100 < busy_pct:
                return time.monotonic() - t0
        if not strict:
            return time.monotonic() - t0
        raise RuntimeError(f"pcn-agent still busy {timeout:.0f} s after its data plane came up; "
                           f"its log ends:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the agent (it leaves its data plane for a successor, as designed)
        and remove what it left: pins and state; the namespaces take the rest."""
        if self.profiler is not None:
            self._stop_profiler()
        if self.proc is not None:
            stop(self.proc, timeout=15)
            self.proc = None
        bpffs.remove_instance(self.pin_dir)
        # its JSON state and the service store (dataplane.servicestore) beside it
        for f in self.state_dir.glob(f"{self.node}.*"):
            f.unlink(missing_ok=True)


# ------------------------------------------------------------------ objects
def service(name: str, vip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}"},
            "spec": {"clusterIP": vip, "type": "ClusterIP",
                     "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP",
                                "targetPort": TARGET_PORT}]}}


def endpoint_slice(name: str, service_name: str, ips: list[str]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def _expected(ips: list[str]) -> list[tuple[str, int]]:
    return sorted((ip, TARGET_PORT) for ip in ips)


def _carried(maps: ServiceMaps, vip: str, ips: list[str]) -> bool:
    got = maps.backends(vip, SERVICE_PORT)
    return got is not None and sorted(got) == _expected(ips)


def _stats_ms(samples: list[float]) -> dict[str, float]:
    return {"min_ms": round(min(samples), 2), "max_ms": round(max(samples), 2),
            "mean_ms": round(statistics.fmean(samples), 2)}


# ------------------------------------------------------------------ scenarios
def populate(kube: Kube, n: int, per_service: int) -> tuple[dict[str, list[str]], float]:
    """`n` Services svc-00000... (ClusterIPs from 10.96.16.0) with one
    EndpointSlice each of `per_service` ready endpoints, every endpoint an
    address of its own in the cluster's pod range (10.244.16.0 on: other
    nodes' pods, as far as this node knows); all created through the API
    before the agent starts. Returns ({ClusterIP: endpoint addresses}, seconds
    the creation took)."""
    base, pods = ipaddress.IPv4Address("10.96.16.0"), ipaddress.IPv4Address("10.244.16.0")
    if n * per_service > 65536 - 16 * 256 or n > 65536 * 15:
        raise ValueError(f"{n} Services x {per_service} endpoints do not fit the address ranges")
    wanted: dict[str, list[str]] = {}
    svcs, slices = [], []
    for i in range(n):
        vip = str(base + i)
        ips = [str(pods + i * per_service + k) for k in range(per_service)]
        wanted[vip] = ips
        svcs.append(service(f"svc-{i:05d}", vip))
        slices.append(endpoint_slice(f"svc-{i:05d}-x", f"svc-{i:05d}", ips))
    return wanted, kube.create_all(svcs + slices)


def wait_all_carried(agent: AgentProcess, maps: ServiceMaps, wanted: dict[str, list[str]],
                     poll_s: float, deadline: float) -> float:
    """Poll the pinned maps until every ClusterIP of `wanted` carries exactly
    its backends; returns time.monotonic() of the poll that found them all.
    A poll first counts lb_services' keys (one walk); only when there are
    enough does it look every service up, so that polling does not take the
    CPU the agent needs. The lbrp writes a new service's slots before its
    lb_services entry: once the count is reached, the entries counted were
    complete when counted."""
    n, last = len(wanted), -1
    while True:
        agent.check_alive()
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"not all {n} services in the data plane ({last} entries in "
                               f"lb_services); agent log:\n{agent.log_tail()}")
        last = maps.services.count()
        counted = time.monotonic()
        if last >= n and all(_carried(maps, vip, ips) for vip, ips in wanted.items()):
            return counted
        time.sleep(poll_s)


def endpoints_to_dataplane(ctx: Context) -> list[Result]:
    rng = random.Random(4)
    n, per = ctx.endpoint_services, ctx.endpoints_per_service
    with ExitStack() as st:
        kube = kube_for(ctx, st, "ep")
        agent = AgentProcess(ctx, st, "ep", kube)
        wanted, populate_s = populate(kube, n, per)
        ctx.progress(f"{ENDPOINTS}: {n} Services and {n} EndpointSlices ({n * per} endpoints) "
                     f"in the API in {populate_s:.1f} s; starting the agent")
        t = agent.start(st, profile=False)
        maps = agent.wait_ready()
        st.callback(maps.close)
        t_all = wait_all_carried(agent, maps, wanted, COLD_POLL_S, t + READY_TIMEOUT_S)
        idle_s = agent.wait_idle(busy_pct=IDLE_CPU * 100, timeout=IDLE_MAX_S, strict=False)
        ctx.progress(f"{ENDPOINTS}: agent's data plane up, all {n} Services in it "
                     f"{t_all - t:.1f} s after its start; agent idle {idle_s:.1f} s later")
        net = ipaddress.IPv4Network(agent.pod_cidr)
        pool = [str(net.network_address + h) for h in range(20, 250)]
        k = n // 2  # the Service whose EndpointSlice changes: one among all the others
        vip = str(ipaddress.IPv4Address("10.96.16.0") + k)
        ips = wanted[vip]
        sl = endpoint_slice(f"svc-{k:05d}-x", f"svc-{k:05d}", ips)
        samples: list[float] = []
        agent.start_profile()  # PCN_BENCH_AGENT_PROFILE: the changes only
        ctx.progress(f"{ENDPOINTS}: timing {ctx.endpoint_changes} EndpointSlice changes "
                     f"of svc-{k:05d}")
        for i in range(ctx.endpoint_changes):
            while True:
                new = sorted(rng.sample(pool, rng.choice((1, 2))))
                if new != ips:
                    break
            body = {"endpoints": [{"addresses": [ip], "conditions": {"ready": True}}
                                  for ip in new]}
            t0 = time.perf_counter()
            kube.merge_patch(sl, body)
            while not _carried(maps, vip, new):
                if time.perf_counter() - t0 > CHANGE_TIMEOUT_S:
                    agent.check_alive()
                    raise RuntimeError(f"change {i + 1} ({ips} -> {new}) not in the data plane "
                                       f"after {CHANGE_TIMEOUT_S:.0f} s; agent log:\n"
                                       f"{agent.log_tail()}")
                time.sleep(POLL_S)
            samples.append((time.perf_counter() - t0) * 1000)
            ips = new
            if (i + 1) % 25 == 0:
                ctx.progress(f"{ENDPOINTS}: {i + 1} changes, last {samples[-1]:.1f} ms")
            time.sleep(rng.uniform(0.02, 0.08))
    p50, p99 = statistics.median(samples), percentile(samples, 99)
    ctx.progress(f"{ENDPOINTS}/pcn: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
                 f"(min {min(samples):.1f}, max {max(samples):.1f}) with {n} Services, "
                 f"{n * per} endpoints in the API")
    common = {"changes": len(samples), "date": now_iso(), **_stats_ms(samples),
              "services": n, "endpoints": n * per, "populate_s": round(populate_s, 1),
              "all_services_after_start_s": round(t_all - t, 2),
              "settled_s": round(idle_s, 1),
              "agent": f"pcn-agent subprocess, {kube.what}", **_note(kube),
              "what": "merge PATCH of one Service's EndpointSlice sent (with the other "
                      "Services and EndpointSlices in the API) -> pinned lb_services/lb_slots "
                      "hold exactly the new backends (polled every 0.5 ms)"}
    return [Result(ENDPOINTS, "pcn", "latency", p50, "ms",
                   {"stat": "median", "samples_ms": [round(x, 2) for x in samples], **common}),
            Result(ENDPOINTS, "pcn", "latency-p99", p99, "ms", {"stat": "p99", **common})]


def _note(kube: Kube) -> dict[str, str]:
    return {"note": kube.note} if kube.note else {}


def agent_cold_start(ctx: Context) -> list[Result]:
    n, per = ctx.cold_services, ctx.endpoints_per_service
    with ExitStack() as st:
        kube = kube_for(ctx, st, "cold")
        agent = AgentProcess(ctx, st, "cold", kube)
        wanted, populate_s = populate(kube, n, per)
        ctx.progress(f"{COLD_START}: {n} Services and {n} EndpointSlices ({n * per} "
                     f"endpoints) in the API in {populate_s:.1f} s; starting the agent")
        t0 = agent.start(st)
        deadline = t0 + READY_TIMEOUT_S
        while not agent.socket.exists() or not ServiceMaps.exist(agent.pin_dir):
            agent.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent's data plane is not up after "
                                   f"{READY_TIMEOUT_S:.0f} s; its log ends:\n{agent.log_tail()}")
            time.sleep(0.01)
        t_up = time.monotonic()
        ctx.progress(f"{COLD_START}: data plane up after {t_up - t0:.2f} s")
        maps = ServiceMaps(agent.pin_dir)
        st.callback(maps.close)
        t_all = wait_all_carried(agent, maps, wanted, COLD_POLL_S, deadline)
    total, up, after = t_all - t0, t_up - t0, t_all - t_up
    ctx.progress(f"{COLD_START}/pcn: all {n} services realised {total:.2f} s after the start "
                 f"(data plane up at {up:.2f} s, services {after:.2f} s after that)")
    common = {"services": n, "endpoints": n * per, "populate_s": round(populate_s, 1),
              "date": now_iso(), "poll_s": COLD_POLL_S,
              "agent": f"pcn-agent subprocess, {kube.what}", **_note(kube)}
    return [
        Result(COLD_START, "pcn", "time", total, "s",
               {"what": "agent process started -> every Service in the pinned maps with its "
                        "backends", **common}),
        Result(COLD_START, "pcn", "dataplane-up", up, "s",
               {"what": "agent process started -> local API socket (node data plane built, "
                        "cubes compiled)", **common}),
        Result(COLD_START, "pcn", "services-after-up", after, "s",
               {"what": "data plane up -> every Service realised", **common}),
    ]


def _cni_del(node: str, sb: kubelet.PodSandbox, conf: dict[str, Any]) -> None:
    try:
        kubelet.run_cni(node, "DEL", sb, conf)
    except Exception as exc:  # keep tearing down; the leftover check reports what stays
        log.warning("CNI DEL of %s failed: %s", sb.container_id, exc)


# The phases of one ADD, in order, from the plugin's PCN_CNI_TRACE marks
# (pcn_agent.cni.commands) and the bench's own clock around the call; each is
# the time from the previous mark to its own (ms).
CNI_PHASES = {
    "start": "the call -> the plugin runs: `ip netns exec`, exec, then the C launcher's "
             "connect and the agent's accept, or the Python plugin's interpreter start",
    "imports": "the Python plugin's imports; with the launcher, the wait for a turn among "
               "the agent's CNI invocations (CniService.concurrency at once)",
    "parse": "CNI_* and the configuration parsed",
    "checks": "pod netns checked, no host link yet",
    "ipam": "the IPAM plugin's ADD (an exec of host-local)",
    "link": "veth pair, address, routes (rtnetlink, setns into the pod)",
    "agent": "the agent's attach, round trip on its unix socket",
    "agent-lock-wait": "of which: waiting for the agent's node lock",
    "agent-op": "of which: the attach under that lock",
    "agent-save": "of which: the wait for the state save that covers the attach, and that "
                  "save if no other did (a group commit: one save covers every op before it)",
    "result": "the result printed",
    "exit": "interpreter exit, the bench sees the process end",
}


def _cni_phases(trace: dict[str, Any], t_call: float, t_return: float) -> dict[str, float]:
    """One ADD's phases (ms, CNI_PHASES' keys) from its trace line and the
    bench's time.monotonic() just before the call and just after it returned
    (the plugin's marks are time.monotonic() too: one clock)."""
    marks = dict(trace["marks"])
    order = [("start", "entered"), ("imports", "imported"), ("parse", "parsed"),
             ("checks", "checked"), ("ipam", "ipam"), ("link", "link"), ("agent", "agent"),
             ("result", "done")]
    out: dict[str, float] = {}
    prev = t_call
    for phase, name in order:
        if name in marks:
            out[phase] = (marks[name] - prev) * 1000
            prev = marks[name]
    out["exit"] = (t_return - prev) * 1000
    agent = trace.get("agent") or {}
    if "lock_wait_ms" in agent:
        out["agent-lock-wait"] = float(agent["lock_wait_ms"])
        out["agent-op"] = float(agent["op_ms"])
    if "save_ms" in agent:
        out["agent-save"] = float(agent["save_ms"])
    return out


def _phase_table(per_add: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50 and p99 (ms) of each phase over the ADDs."""
    out = {}
    for phase in CNI_PHASES:
        xs = [p[phase] for p in per_add if phase in p]
        if xs:
            out[phase] = {"p50_ms": round(statistics.median(xs), 2),
                          "p99_ms": round(percentile(xs, 99), 2)}
    return out


def _phase_line(table: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} {v['p50_ms']:.1f}" for k, v in table.items())


class CniNode:
    """The agent of a one-node lab, and ADDs on it by the real plugin with
    PCN_CNI_TRACE on: each ADD's wall time and phases."""

    def __init__(self, ctx: Context, st: ExitStack, tag: str) -> None:
        self.ctx = ctx
        self.st = st
        self.agent = agent = AgentProcess(ctx, st, tag)
        ctx.progress(f"{tag}: starting a pcn-agent on a one-node lab (it compiles the "
                     "node's programs)")
        t = agent.start(st)
        agent.wait_ready().close()
        ctx.progress(f"{tag}: agent's data plane up in {time.monotonic() - t:.1f} s; waiting "
                     "for its background compiles to end before timing")
        idle = agent.wait_idle()
        ctx.progress(f"{tag}: agent idle (background compiles done) {idle:.1f} s later")
        self.conf = kubelet.network_config(agent.pod_cidr, agent.gateway, str(agent.socket),
                                           str(agent.dir / "ipam"), mtu=MTU)
        self.trace = agent.dir / "cni-trace.jsonl"
        self.sandboxes: list[kubelet.PodSandbox] = []
        self._n = 0

    def sandbox(self) -> kubelet.PodSandbox:
        """A pod namespace (made before CNI, as a runtime makes the sandbox; not timed)."""
        self._n += 1
        ns = self.ctx.nss.create(f"cni{self._n:03d}")
        self.st.callback(self.ctx.nss.remove, ns)
        return kubelet.PodSandbox(NAMESPACE, f"pod-{self._n}", secrets.token_hex(16), ns)

    def add(self, sb: kubelet.PodSandbox) -> tuple[float, float, float]:
        """CNI ADD of `sb`: (ms, monotonic s before, after)."""
        t0 = time.monotonic()
        result = kubelet.run_cni(self.agent.node, "ADD", sb, self.conf,
                                 extra_env={"PCN_CNI_TRACE": str(self.trace)})
        t1 = time.monotonic()
        self.st.callback(_cni_del, self.agent.node, sb, self.conf)
        sb.ip = str(ipaddress.IPv4Interface(result["ips"][0]["address"]).ip)
        self.sandboxes.append(sb)
        return (t1 - t0) * 1000, t0, t1

    def phases(self, calls: dict[str, tuple[float, float]]) -> list[dict[str, float]]:
        """Each ADD's phases, matched by container id to `calls` (its t0, t1)."""
        out = []
        for line in self.trace.read_text().splitlines():
            tr = json.loads(line)
            if tr.get("command") == "ADD" and tr.get("container_id") in calls:
                out.append(_cni_phases(tr, *calls[tr["container_id"]]))
        return out

    def check_pods(self, pods: list[kubelet.PodSandbox]) -> None:
        """The pods work (not timed): each pings its gateway."""
        for sb in pods:
            ping = exec_in(sb.netns, ["ping", "-c", "1", "-W", "2", self.agent.gateway],
                           check=False)
            if ping.returncode != 0:
                raise RuntimeError(f"pod {sb.name} added by pcn-cni cannot ping its gateway")


class BridgeNode:
    """The reference: the CNI project's `bridge` plugin (Go, a Linux bridge,
    the same host-local IPAM) on a node namespace of its own, run the same
    way (`ip netns exec <node>`, configuration on stdin), so that pcn-cni's
    times can be read against it within one run on a noisy machine."""

    def __init__(self, ctx: Context, st: ExitStack, tag: str) -> None:
        self.ctx = ctx
        self.st = st
        self.tag = tag
        node = ctx.nss.create(f"{tag}-br")
        st.callback(ctx.nss.remove, node)
        self.cni = LinuxBridgeCNI(ctx.nss, node, ctx.tmp / f"{tag}-host-local", MTU,
                                  network_name=f"{ctx.nss.prefix}-{tag}")
        st.callback(self.cni.delete_all)  # CNI DEL before the namespaces go
        self._n = 0

    def sandbox(self) -> str:
        self._n += 1
        pod = self.ctx.nss.create(f"{self.tag}-b{self._n:03d}")
        self.st.callback(self.ctx.nss.remove, pod)
        return pod

    def add(self, pod: str) -> tuple[float, float, float]:
        """CNI ADD of the pod namespace `pod`: (ms, monotonic s before, after)."""
        t0 = time.monotonic()
        self.cni._invoke("ADD", pod, pod)
        t1 = time.monotonic()
        self.cni.added.append((pod, pod))
        return (t1 - t0) * 1000, t0, t1


def _latency_results(scenario: str, variant: str, samples: list[float],
                     common: dict[str, Any]) -> list[Result]:
    return [Result(scenario, variant, "latency", statistics.median(samples), "ms",
                   {"stat": "median", "samples_ms": [round(x, 1) for x in samples],
                    **_stats_ms(samples), **common}),
            Result(scenario, variant, "latency-p99", percentile(samples, 99), "ms",
                   {"stat": "p99", **_stats_ms(samples), **common})]


def cni_add(ctx: Context) -> list[Result]:
    samples: list[float] = []
    ref: list[float] = []
    calls: dict[str, tuple[float, float]] = {}
    with ExitStack() as st:
        node = CniNode(ctx, st, CNI_ADD)
        bridge = BridgeNode(ctx, st, "cniref")
        bridge.add(bridge.sandbox())  # its bridge device is made by the first ADD
        ctx.progress(f"{CNI_ADD}/pcn: timing {ctx.cni_adds} CNI ADDs (pcn-cni, host-local), "
                     f"each followed by one of the reference `bridge` plugin")
        for _ in range(ctx.cni_adds):
            sb = node.sandbox()
            ms, t0, t1 = node.add(sb)
            samples.append(ms)
            calls[sb.container_id] = (t0, t1)
            ref.append(bridge.add(bridge.sandbox())[0])
        node.check_pods([node.sandboxes[0], node.sandboxes[-1]])
        phases = _phase_table(node.phases(calls))
    p50, p99 = statistics.median(samples), percentile(samples, 99)
    ctx.progress(f"{CNI_ADD}/pcn: p50 {p50:.0f} ms, p99 {p99:.0f} ms "
                 f"(min {min(samples):.0f}, max {max(samples):.0f}); reference bridge plugin "
                 f"p50 {statistics.median(ref):.0f} ms, p99 {percentile(ref, 99):.0f} ms; "
                 f"pcn phases p50 (ms): {_phase_line(phases)}")
    common = {"pods": len(samples), "date": now_iso()}
    return [*_latency_results(CNI_ADD, "pcn", samples, {
                **common, "phases": phases, "phase_meaning": CNI_PHASES,
                "what": f"kubelet.run_cni ADD: `ip netns exec <node> "
                        f"{' '.join(kubelet.cni_binary())}`, host-local IPAM, attach by a running "
                        "pcn-agent; one at a time"}),
            *_latency_results(CNI_ADD, "linux-bridge", ref, {
                **common, "what": "the reference `bridge` CNI plugin (Go; Linux bridge, "
                                  "host-local IPAM) run the same way, each right after a "
                                  "pcn-cni ADD"})]


def _parallel(n: int, add: Callable[[Any], tuple[float, float, float]],
              pods: list[Any]) -> tuple[list[float], float, list[tuple[float, float]]]:
    """`add` on every pod at once (threads behind a barrier): each call's ms,
    the total ms (first start to last end) and each call's (t0, t1)."""
    gate = threading.Barrier(n)

    def one(pod: Any) -> tuple[float, float, float]:
        gate.wait()  # every thread is ready: the ADDs start together
        return add(pod)

    with ThreadPoolExecutor(n) as pool:
        timed = list(pool.map(one, pods))
    total = (max(t1 for _, _, t1 in timed) - min(t0 for _, t0, _ in timed)) * 1000
    return [ms for ms, _, _ in timed], total, [(t0, t1) for _, t0, t1 in timed]


def cni_add_parallel(ctx: Context) -> list[Result]:
    n = ctx.cni_parallel
    with ExitStack() as st:
        node = CniNode(ctx, st, CNI_ADD_PARALLEL)
        bridge = BridgeNode(ctx, st, "cniparref")
        pods = [node.sandbox() for _ in range(n)]
        ref_pods = [bridge.sandbox() for _ in range(n)]
        node.add(node.sandbox())  # one ADD first, alone: the agent's first is not the point
        bridge.add(bridge.sandbox())
        ctx.progress(f"{CNI_ADD_PARALLEL}/pcn: {n} CNI ADDs at once on one node, then {n} of "
                     f"the reference `bridge` plugin")
        samples, total, times = _parallel(n, node.add, pods)
        ref, ref_total, _ = _parallel(n, bridge.add, ref_pods)
        calls = {sb.container_id: t for sb, t in zip(pods, times, strict=True)}
        ips = {sb.ip for sb in pods}
        if len(ips) != n:
            raise RuntimeError(f"{n} parallel ADDs gave {len(ips)} distinct addresses")
        node.check_pods(pods)
        phases = _phase_table(node.phases(calls))
    p50, p99 = statistics.median(samples), percentile(samples, 99)
    ctx.progress(f"{CNI_ADD_PARALLEL}/pcn: each ADD p50 {p50:.0f} ms, p99 {p99:.0f} ms; all "
                 f"{n} done in {total:.0f} ms; reference bridge plugin p50 "
                 f"{statistics.median(ref):.0f} ms, p99 {percentile(ref, 99):.0f} ms, all in "
                 f"{ref_total:.0f} ms; pcn phases p50 (ms): {_phase_line(phases)}")
    common = {"pods": n, "date": now_iso()}
    what = (f"{n} kubelet.run_cni ADDs started at once (threads behind a barrier) on one "
            f"node, as in cni-add; each sample is one ADD's wall time")
    ref_what = f"the reference `bridge` CNI plugin, {n} ADDs at once, right after pcn's"
    return [*_latency_results(CNI_ADD_PARALLEL, "pcn", samples, {
                **common, "total_ms": round(total, 1), "phases": phases,
                "phase_meaning": CNI_PHASES, "what": what}),
            Result(CNI_ADD_PARALLEL, "pcn", "latency-total", total, "ms",
                   {"what": f"first of the {n} ADDs started -> last returned", **common}),
            *_latency_results(CNI_ADD_PARALLEL, "linux-bridge", ref, {
                **common, "total_ms": round(ref_total, 1), "what": ref_what}),
            Result(CNI_ADD_PARALLEL, "linux-bridge", "latency-total", ref_total, "ms",
                   {"what": f"first of the {n} ADDs started -> last returned", **common})]


SCENARIOS = {ENDPOINTS: endpoints_to_dataplane, COLD_START: agent_cold_start, CNI_ADD: cni_add,
             CNI_ADD_PARALLEL: cni_add_parallel}


# ------------------------------------------------------------------ profiles
def top(path: Path, limit: int = 25) -> str:
    """The functions that took the most samples in a py-spy raw profile
    (collapsed stacks, "frame;frame;... count" per line, outermost first,
    as start_profile() records them): by own samples (the innermost frame)
    and by total samples (anywhere in the stack), each with its share of
    all samples."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        c = int(count)
        n += c
        own[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    if not n:
        return f"{path}: no samples"
    out = [f"{path}: {n} samples"]
    for title, counter in (("own", own), ("total", total)):
        out.append(f"-- by {title} samples")
        out += [f"{c * 100 / n:5.1f}%  {f}" for f, c in counter.most_common(limit)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.controlplane",
                                description="Summarise an agent profile recorded with "
                                            "PCN_BENCH_AGENT_PROFILE=FILE (py-spy raw).")
    p.add_argument("--top", type=Path, required=True, metavar="FILE", help="a profile")
    p.add_argument("-n", type=int, default=25, help="functions listed per table (default 25)")
    args = p.parse_args(argv)
    print(top(args.top, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
