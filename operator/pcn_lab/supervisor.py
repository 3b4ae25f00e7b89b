"""The lab's supervisor: one background process that owns a lab (emulated API
server and its proxy, one network namespace per node with a real pcn-agent,
the kubelet stand-in wiring pods with the real pcn-cni, Service addresses and
EndpointSlices), its state file, and `cleanup`, which removes everything a
lab made, also after a crash."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pyroute2 import netns as pr_netns

from pcn_agent.dataplane import bpffs
from pcn_agent.dataplane.runtime import STATE_ROOT
from pcn_lab import checks, controllers, kubelet
from pcn_lab.apiserver import EmulatedApiServer, apply
from pcn_lab.manifests import manifest_files
from pcn_lab.topology import Lab

log = logging.getLogger("pcn_lab.supervisor")

LAB_ROOT = Path(os.environ.get("PCN_LAB_DIR", "/run/pcn-lab"))
LAB_REQUEST_LOG_KEEP = 64  # see EmulatedApiServer: a long-running kmock slows with its record
POD_TCP, POD_UDP = checks.TCP_PORT, checks.UDP_PORT


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- state
@dataclass
class LabState:
    """What a running lab is made of, on disk so any command (and `down` after
    a crash) can find it."""

    dir: Path
    run_id: str = ""
    nodes: int = 0
    supervisor_pid: int = 0
    api_url: str = ""
    ready: bool = False
    error: str = ""
    agents: dict[str, int] = field(default_factory=dict)  # node -> pid
    restarts: dict[str, int] = field(default_factory=dict)  # node -> agent restarts
    prefix: str = ""

    @property
    def file(self) -> Path:
        return self.dir / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in self.__dict__.items() if k != "dir"}
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.file)

    @classmethod
    def load(cls, d: Path = LAB_ROOT) -> LabState | None:
        f = d / "state.json"
        if not f.is_file():
            return None
        return cls(d, **json.loads(f.read_text()))


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive; the state follows the command name's ")"
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def write_kubeconfig(path: Path, url: str, namespace: str = "default") -> None:
    """A kubeconfig whose current context is the lab at `url`, in `namespace`."""
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "pcn-lab",
           "clusters": [{"name": "pcn-lab", "cluster": {"server": url}}],
           "users": [{"name": "pcn-lab", "user": {}}],
           "contexts": [{"name": "pcn-lab", "context": {"cluster": "pcn-lab", "user": "pcn-lab",
                                                       "namespace": namespace}}]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tmp.replace(path)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Kubernetes objects from a YAML file or the files a folder's
    manifests come from (pcn_lab.manifests.manifest_files: what the real
    cluster's `up --kubernetes -f` applies too), in that order."""
    files = manifest_files(path)
    if not files:
        raise FileNotFoundError(f"no YAML files found at {path}")
    docs: list[dict[str, Any]] = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") == "Namespace":
                continue  # the emulated API server has namespaces implicitly
            if doc.get("kind") == "List":
                docs.extend(doc.get("items") or [])
            else:
                docs.append(doc)
    return docs


class RestartBackoff:
    """kubelet's back-off for restarting a container of a pod with
    restartPolicy Always (a DaemonSet's): the first restart at once, then
    `initial` seconds after the next exit, doubling up to `cap`
    (CrashLoopBackOff); a run of `reset_after` seconds or more forgets the
    back-off. kubelet's defaults: 10 s, 300 s, 10 minutes."""

    def __init__(self, initial: float = 10.0, cap: float = 300.0,
                 reset_after: float = 600.0) -> None:
        self.initial, self.cap, self.reset_after = initial, cap, reset_after
        self._next: dict[str, float] = {}

    def delay(self, key: str, ran_for: float) -> float:
        """Seconds to wait before restarting `key`, which exited after
        running `ran_for` seconds."""
        if ran_for >= self.reset_after or key not in self._next:
            self._next[key] = self.initial
            return 0.0
        delay = self._next[key]
        self._next[key] = min(delay * 2, self.cap)
        return delay


# ----------------------------------------------------------------------------- supervisor
class Supervisor:
    """Runs in the background for the life of the lab."""

    def __init__(self, state: LabState, nodes: int, pods_per_node: int) -> None:
        self.state = state
        self.nodes_count = nodes
        self.pods_per_node = pods_per_node
        self.lab = Lab(nodes_count=nodes, pods_per_node=0, dataplane=False,
                       run_id=state.run_id)
        # a lab runs for hours: keep kmock's request record short (see its doc)
        self.api = EmulatedApiServer(keep_requests=LAB_REQUEST_LOG_KEEP)
        self.proxy: Any = None
        self.agents: dict[str, subprocess.Popen] = {}
        self.agent_started: dict[str, float] = {}  # node -> time.monotonic() of the start
        self.restart_at: dict[str, float] = {}  # node -> when to start its dead agent again
        self.backoff = RestartBackoff()
        self.sandboxes: dict[tuple[str, str], kubelet.PodSandbox] = {}
        self.sandbox_node: dict[tuple[str, str], str] = {}
        self.servers: dict[tuple[str, str], subprocess.Popen] = {}
        self.pod_errors: dict[tuple[str, str], str] = {}  # why a pod did not start, last
        self.cni: dict[str, dict[str, Any]] = {}
        self.stopping = asyncio.Event()
        self._rr = 0

    # -- life cycle ----------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        me = os.getpid()

        def on_signal(_sig: int, _frame: object) -> None:
            # pyroute2 forks helpers (namespace creation) that inherit this handler
            # and are stopped with SIGTERM: in them, just exit. asyncio's own
            # add_signal_handler would instead hear their signals as ours.
            if os.getpid() != me:
                os._exit(0)
            loop.call_soon_threadsafe(self.stopping.set)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        try:
            await loop.run_in_executor(None, self._build)
            from pcn_lab.apiproxy import ApiProxy

            self.proxy = await ApiProxy(self.api.url).start()
            self.state.api_url = self.proxy.url
            write_kubeconfig(self.state.kubeconfig, self.proxy.url)
            await loop.run_in_executor(None, self._register_cluster)
            self._start_agents()
            self.state.save()
            await self._wait_agents_ready()
            self._seed_pods()
            for _ in range(600):  # until the seeded pods run
                self._restart_dead_agents()
                await loop.run_in_executor(None, self._controllers)
                if self._all_running():
                    break
                await asyncio.sleep(0.2)
            self.state.ready = True
            self.state.save()
            failing = ""
            while not self.stopping.is_set():
                self._restart_dead_agents()
                try:
                    await loop.run_in_executor(None, self._controllers)
                    failing = ""
                except Exception as exc:  # e.g. the API unreachable: once, not every pass
                    if repr(exc) != failing:
                        log.exception("lab controllers failed; retrying on every pass")
                        failing = repr(exc)
                try:
                    await asyncio.wait_for(self.stopping.wait(), 0.3)
                except TimeoutError:
                    pass
        except Exception as exc:
            self.state.error = f"{type(exc).__name__}: {exc}"
            self.state.save()
            log.exception("lab failed")
        finally:
            await self._teardown()

    def _build(self) -> None:
        self.lab.build()
        self.api.start()

    def _register_cluster(self) -> None:
        for i in range(1, self.nodes_count + 1):
            name = self.lab.node_name(i)
            apply(self.api, {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "spec": {"podCIDR": self.lab.pod_cidr(i)},
                "status": {"addresses": [{"type": "InternalIP", "address": self.lab.node_ip(i)}],
                           "conditions": [{"type": "Ready", "status": "True"}]}})
            net = ipaddress.IPv4Network(self.lab.pod_cidr(i))
            self.cni[name] = kubelet.network_config(
                str(net), str(net.network_address + 1), str(self.state.dir / f"{name}.sock"),
                str(self.state.dir / f"ipam-{name}"), mtu=1450)

    def _start_agents(self) -> None:
        settings = self.state.dir / "config.json"
        settings.write_text(json.dumps({"podCIDR": "10.244.0.0/16", "mtu": "1450"}))
        for i in range(1, self.nodes_count + 1):
            self._start_agent(self.lab.node_name(i))

    def _start_agent(self, name: str) -> None:
        exe = str(Path(sys.executable).parent / "pcn-agent")
        # The agent process stays in the root namespace (the API server is on its
        # loopback) and drives the node's data plane inside the node namespace.
        env = {**os.environ, "NODE_NAME": name, "PCN_NETNS": name,
               "PCN_KUBE_URL": self.proxy.url,
               "PCN_SOCKET": str(self.state.dir / f"{name}.sock"),
               "PCN_CONFIG": str(self.state.dir / "config.json"), "PCN_METRICS_PORT": "0",
               "PCN_LIVENESS": "", "PCN_STATE_DIR": str(self.state.dir / "agent-state")}
        with open(self.state.dir / f"agent-{name}.log", "ab") as logf:
            self.agents[name] = subprocess.Popen(
                [exe], env=env, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        self.agent_started[name] = time.monotonic()
        self.state.agents[name] = self.agents[name].pid

    def _restart_dead_agents(self) -> None:
        """What the DaemonSet's kubelet does for a node's agent that exited:
        start it again, after kubelet's back-off (RestartBackoff)."""
        now = time.monotonic()
        for name, proc in list(self.agents.items()):
            code = proc.poll()
            if code is None:
                continue
            if name not in self.restart_at:
                delay = self.backoff.delay(name, now - self.agent_started[name])
                self.restart_at[name] = now + delay
                log.warning("agent on %s exited (code %s); restarting it in %.0f s", name, code,
                            delay)
                self.state.save()
            if now >= self.restart_at[name]:
                del self.restart_at[name]
                self._start_agent(name)
                self.state.restarts[name] = self.state.restarts.get(name, 0) + 1
                self.state.save()
                log.info("agent on %s restarted (pid %d, restart %d)", name,
                         self.agents[name].pid, self.state.restarts[name])

    async def _wait_agents_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        socks = [self.state.dir / f"{n}.sock" for n in self.agents]
        while time.monotonic() < deadline:
            dead = [n for n, p in self.agents.items() if p.poll() is not None]
            if dead:
                code = self.agents[dead[0]].returncode
                raise RuntimeError(f"agent on {dead[0]} exited (code {code}); see "
                                   f"{self.state.dir / f'agent-{dead[0]}.log'}")
            if all(s.exists() for s in socks):
                return
            await asyncio.sleep(0.3)
        raise RuntimeError("agents did not come up in time; see the agent-*.log files in "
                           f"{self.state.dir}")

    def _seed_pods(self) -> None:
        for i in range(1, self.nodes_count + 1):
            for j in range(1, self.pods_per_node + 1):
                apply(self.api, {"apiVersion": "v1", "kind": "Pod",
                                 "metadata": {"name": f"pod-{i}-{j}", "namespace": "default",
                                              "labels": {"app": "lab", "lab-node": str(i)}},
                                 "spec": {"nodeName": self.lab.node_name(i),
                                          "containers": [{"name": "probe", "image": "probe"}]}})

    def _all_running(self) -> bool:
        pods = self.api.request("GET", "/api/v1/pods").get("items", [])
        return all((p.get("status") or {}).get("podIP") for p in pods)

    async def _teardown(self) -> None:
        loop = asyncio.get_running_loop()
        for p in self.agents.values():
            p.terminate()
        for p in self.agents.values():
            try:
                await loop.run_in_executor(None, p.wait, 10)
            except subprocess.TimeoutExpired:
                p.kill()
        for key in list(self.sandboxes):
            self._stop_pod(key)
        if self.proxy is not None:
            await self.proxy.stop()
        self.api.stop()
        try:
            self.lab.close()
        except Exception:
            log.exception("lab namespaces")
        cleanup(self.state, keep_dir=True)

    # -- the stand-in controllers ---------------------------------------------
    def _controllers(self) -> None:
        self._kubelet()
        controllers.allocate_service_addresses(self.api)
        controllers.sync_endpoint_slices(self.api)
        controllers.sync_endpoints(self.api)

    def _kubelet(self) -> None:
        pods = self.api.request("GET", "/api/v1/pods").get("items", [])
        seen = set()
        for pod in pods:
            meta = pod["metadata"]
            key = (meta.get("namespace", "default"), meta["name"])
            seen.add(key)
            if key in self.sandboxes or (pod.get("status") or {}).get("podIP"):
                continue
            node = (pod.get("spec") or {}).get("nodeName")
            path = f"/api/v1/namespaces/{key[0]}/pods/{key[1]}"
            if not node:  # the scheduler binds a pod once; its kubelet retries there
                node = self._schedule()
                self.api.request("PATCH", path, {"spec": {"nodeName": node}},
                                 "application/merge-patch+json")
            sb = kubelet.PodSandbox(key[0], key[1], secrets.token_hex(8),
                                    f"{self.lab.prefix}-p-{secrets.token_hex(3)}")
            try:
                kubelet.start_pod(node, sb, self.cni[node], kubelet.port_mappings(pod))
            except Exception as exc:  # retried on every pass, logged when it changes
                if self.pod_errors.get(key) != str(exc):
                    log.error("could not start pod %s/%s: %s", *key, exc)
                    self.pod_errors[key] = str(exc)
                continue
            self.pod_errors.pop(key, None)
            self.sandboxes[key] = sb
            self.sandbox_node[key] = node
            tcp, udp = kubelet.container_ports(pod, POD_TCP, POD_UDP)
            self.servers[key] = subprocess.Popen(
                ["ip", "netns", "exec", sb.netns, *checks.probe_argv(
                    "serve", *[a for p in tcp for a in ("--tcp", str(p))],
                    *[a for p in udp for a in ("--udp", str(p))])],
                env={"PCN_PROBE_NAME": key[1], "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # where the lab finds the pod, then the kubelet's status (its own subresource)
            self.api.request("PATCH", path, {
                "metadata": {"annotations": {"pcn.dev/lab-netns": sb.netns}}},
                "application/merge-patch+json")
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.api.request("PATCH", f"{path}/status", {"status": {
                "phase": "Running", "podIP": sb.ip, "podIPs": [{"ip": sb.ip}],
                "hostIP": self.lab.node_ip(self._node_index(node)), "startTime": now,
                "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                               for t in ("PodScheduled", "Initialized", "ContainersReady",
                                         "Ready")]}}, "application/merge-patch+json")
            log.info("pod %s/%s runs on %s at %s", *key, node, sb.ip)
        for key in list(self.sandboxes):
            if key not in seen:
                self._stop_pod(key)

    def _stop_pod(self, key: tuple[str, str]) -> None:
        sb = self.sandboxes.pop(key)
        srv = self.servers.pop(key, None)
        if srv is not None:
            srv.terminate()
            srv.wait(5)
        node = self.sandbox_node.pop(key)
        try:
            kubelet.stop_pod(node, sb, self.cni[node])
        except Exception as exc:
            log.error("CNI DEL of %s/%s failed: %s", *key, exc)
        log.info("pod %s/%s removed from %s", *key, node)

    def _schedule(self) -> str:
        self._rr += 1
        return self.lab.node_name((self._rr - 1) % self.nodes_count + 1)

    def _node_index(self, node: str) -> int:
        return int(node.rsplit("n", 1)[1])


# ----------------------------------------------------------------------------- cleanup
def lab_netns_inodes(state: LabState) -> set[int]:
    """The inodes of the lab's network namespaces (its prefix): taken before
    the lab stops, whose supervisor removes the pods' and nodes' names, so
    that what still runs in them can be found after (kubelet.kill_netns_processes)."""
    if not state.prefix:
        return set()
    return kubelet.netns_inodes([ns for ns in pr_netns.listnetns()
                                 if ns.startswith(state.prefix)])


def cleanup(state: LabState, keep_dir: bool = False) -> list[str]:
    """Remove whatever of a lab is left: namespaces, pins, agent state, and
    (unless `keep_dir`: logs and errors stay for `pcn-lab status`) its files.
    Idempotent; returns what it removed."""
    removed = []
    if state.prefix:
        for ns in pr_netns.listnetns():
            if ns.startswith(state.prefix):
                # e.g. pod servers orphaned by a crash
                kubelet.kill_netns_processes(kubelet.netns_inodes([ns]))
                try:
                    pr_netns.remove(ns)
                    removed.append(f"netns {ns}")
                except OSError:
                    pass
        for d in (bpffs.DEFAULT_ROOT.glob(f"{state.prefix}-*") if bpffs.DEFAULT_ROOT.exists()
                  else []):
            bpffs.remove_instance(d)
            removed.append(f"pins {d}")
        # the nodes' state files and their service stores (<node>.<cube>.services.sqlite*)
        for f in STATE_ROOT.glob(f"{state.prefix}-*.json") if STATE_ROOT.exists() else []:
            f.unlink(missing_ok=True)
        for f in STATE_ROOT.glob(f"{state.prefix}-*.sqlite*") if STATE_ROOT.exists() else []:
            f.unlink(missing_ok=True)
    if state.dir.exists() and not keep_dir:
        for f in sorted(state.dir.rglob("*"), reverse=True):
            if f.is_dir():
                f.rmdir()
            else:
                f.unlink()
        state.dir.rmdir()
        removed.append(f"dir {state.dir}")
    return removed


# ----------------------------------------------------------------------------- commands
