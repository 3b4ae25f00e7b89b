"""pcn-lab: the whole of pcn on one machine, no cluster needed.

    pcn-lab up [--nodes N] [--pods-per-node M] [-f DIR]
    pcn-lab apply -f FILE|DIR
    pcn-lab exec POD -- CMD...
    pcn-lab check
    pcn-lab status
    pcn-lab down

`up` starts, in the background, an emulated Kubernetes API server on
loopback, one network namespace per node with a real `pcn-agent` in it, and
a small stand-in for the rest of Kubernetes: it schedules Pods to nodes,
wires them with the real `pcn-cni` exactly as a kubelet would (each pod runs
a probe server on TCP 8080 and UDP 8081), allocates Service addresses and
keeps EndpointSlices current. It writes a kubeconfig for `kubectl` and
`kubectl pcn`. `down` removes everything, also after a crash.

Network safety: nothing is added to the root namespace; the API listens on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
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

from . import bpffs, checks, kubelet
from .apiserver import ApiServerError, EmulatedApiServer, apply
from .runtime import STATE_ROOT
from .topology import EXTERNAL_IP, Lab

log = logging.getLogger("pcn_agent.lab")

LAB_ROOT = Path(os.environ.get("PCN_LAB_DIR", "/run/pcn-lab"))
SERVICE_RANGE = ipaddress.IPv4Network("10.96.0.0/12")
NODEPORT_RANGE = (30000, 32767)
LAB_REQUEST_LOG_KEEP = 64  # see EmulatedApiServer: a long-running kmock slows with its record
POD_TCP, POD_UDP = checks.TCP_PORT, checks.UDP_PORT


def _say(msg: str) -> None:
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


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def write_kubeconfig(path: Path, url: str) -> None:
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "pcn-lab",
           "clusters": [{"name": "pcn-lab", "cluster": {"server": url}}],
           "users": [{"name": "pcn-lab", "user": {}}],
           "contexts": [{"name": "pcn-lab", "context": {"cluster": "pcn-lab", "user": "pcn-lab",
                                                       "namespace": "default"}}]}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Kubernetes objects from a YAML file or every *.yaml/*.yml/*.json in a
    directory (sorted), skipping kustomization files."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in (".yaml", ".yml", ".json")
        and p.name not in ("kustomization.yaml", "kustomization.yml"))
    if not files:
        raise FileNotFoundError(f"no YAML files found at {path}")
    docs = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") == "Namespace":
                continue  # the emulated API server has namespaces implicitly
            if doc.get("kind") == "List":
                docs.extend(doc.get("items") or [])
            else:
                docs.append(doc)
    return docs


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
        self.sandboxes: dict[tuple[str, str], kubelet.PodSandbox] = {}
        self.sandbox_node: dict[tuple[str, str], str] = {}
        self.servers: dict[tuple[str, str], subprocess.Popen] = {}
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
            from .apiproxy import ApiProxy

            self.proxy = await ApiProxy(self.api.url).start()
            self.state.api_url = self.proxy.url
            write_kubeconfig(self.state.kubeconfig, self.proxy.url)
            await loop.run_in_executor(None, self._register_cluster)
            self._start_agents()
            self.state.agents = {n: p.pid for n, p in self.agents.items()}
            self.state.save()
            await self._wait_agents_ready()
            self._seed_pods()
            for _ in range(600):  # until the seeded pods run
                await loop.run_in_executor(None, self._controllers)
                if self._all_running():
                    break
                await asyncio.sleep(0.2)
            self.state.ready = True
            self.state.save()
            while not self.stopping.is_set():
                try:
                    await loop.run_in_executor(None, self._controllers)
                except Exception:
                    log.exception("lab controllers failed; retrying")
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
        exe = str(Path(sys.executable).parent / "pcn-agent")
        for i in range(1, self.nodes_count + 1):
            name = self.lab.node_name(i)
            # The agent process stays in the root namespace (the API server is on its
            # loopback) and drives the node's data plane inside the node namespace.
            env = {**os.environ, "NODE_NAME": name, "PCN_NETNS": name,
                   "PCN_KUBE_URL": self.proxy.url,
                   "PCN_SOCKET": str(self.state.dir / f"{name}.sock"),
                   "PCN_CONFIG": str(settings), "PCN_METRICS_PORT": "0", "PCN_LIVENESS": "",
                   "PCN_STATE_DIR": str(self.state.dir / "agent-state")}
            logf = open(self.state.dir / f"agent-{name}.log", "ab")  # noqa: SIM115
            self.agents[name] = subprocess.Popen(
                [exe], env=env, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)

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
        self._services()
        self._endpoints()

    def _kubelet(self) -> None:
        pods = self.api.request("GET", "/api/v1/pods").get("items", [])
        seen = set()
        for pod in pods:
            meta = pod["metadata"]
            key = (meta.get("namespace", "default"), meta["name"])
            seen.add(key)
            if key in self.sandboxes or (pod.get("status") or {}).get("podIP"):
                continue
            node = (pod.get("spec") or {}).get("nodeName") or self._schedule()
            sb = kubelet.PodSandbox(key[0], key[1], secrets.token_hex(8),
                                    f"{self.lab.prefix}-p-{secrets.token_hex(3)}")
            try:
                kubelet.start_pod(node, sb, self.cni[node])
            except Exception as exc:
                log.error("could not start pod %s/%s: %s", *key, exc)
                continue
            self.sandboxes[key] = sb
            self.sandbox_node[key] = node
            self.servers[key] = subprocess.Popen(
                ["ip", "netns", "exec", sb.netns, *checks.probe_argv(
                    "serve", "--tcp", str(POD_TCP), "--udp", str(POD_UDP))],
                env={"PCN_PROBE_NAME": key[1], "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            patch = {"metadata": {"annotations": {"pcn.dev/lab-netns": sb.netns}},
                     "spec": {"nodeName": node},
                     "status": {"phase": "Running", "podIP": sb.ip, "podIPs": [{"ip": sb.ip}],
                                "hostIP": self.lab.node_ip(self._node_index(node))}}
            self.api.request("PATCH", f"/api/v1/namespaces/{key[0]}/pods/{key[1]}", patch,
                             "application/merge-patch+json")
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

    def _services(self) -> None:
        """Give Services a cluster IP and NodePorts when they ask for none."""
        svcs = self.api.request("GET", "/api/v1/services").get("items", [])
        used_ips = {(s.get("spec") or {}).get("clusterIP") for s in svcs}
        used_ports = {p.get("nodePort") for s in svcs for p in (s.get("spec") or {}).get("ports")
                      or []}
        for s in svcs:
            spec = s.get("spec") or {}
            patch: dict[str, Any] = {}
            if not spec.get("clusterIP"):
                ip = next(str(a) for a in SERVICE_RANGE.hosts()
                          if int(a) - int(SERVICE_RANGE.network_address) >= 10
                          and str(a) not in used_ips)
                used_ips.add(ip)
                patch["clusterIP"] = ip
            if spec.get("type") in ("NodePort", "LoadBalancer"):
                ports = [dict(p) for p in spec.get("ports") or []]
                changed = False
                for p in ports:
                    if not p.get("nodePort"):
                        p["nodePort"] = next(n for n in range(*NODEPORT_RANGE)
                                             if n not in used_ports)
                        used_ports.add(p["nodePort"])
                        changed = True
                if changed:
                    patch["ports"] = ports
            if patch:
                m = s["metadata"]
                self.api.request("PATCH", f"/api/v1/namespaces/{m.get('namespace', 'default')}"
                                          f"/services/{m['name']}", {"spec": patch},
                                 "application/merge-patch+json")

    def _endpoints(self) -> None:
        """One EndpointSlice per Service with a selector: its running pods."""
        svcs = self.api.request("GET", "/api/v1/services").get("items", [])
        pods = self.api.request("GET", "/api/v1/pods").get("items", [])
        for s in svcs:
            spec = s.get("spec") or {}
            sel = spec.get("selector")
            if not sel:
                continue
            ns = s["metadata"].get("namespace", "default")
            ready = [p for p in pods if p["metadata"].get("namespace", "default") == ns
                     and all((p["metadata"].get("labels") or {}).get(k) == v
                             for k, v in sel.items())
                     and (p.get("status") or {}).get("podIP")]
            ports = [{"name": p.get("name", ""), "protocol": p.get("protocol", "TCP"),
                      "port": int(p.get("targetPort") or p["port"])}
                     for p in spec.get("ports") or []]
            want = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": f"{s['metadata']['name']}-lab", "namespace": ns,
                                 "labels": {"kubernetes.io/service-name": s["metadata"]["name"]}},
                    "addressType": "IPv4", "ports": ports,
                    "endpoints": [{"addresses": [p["status"]["podIP"]],
                                   "conditions": {"ready": True},
                                   "nodeName": p["spec"].get("nodeName"),
                                   "targetRef": {"kind": "Pod", "name": p["metadata"]["name"],
                                                 "namespace": ns}}
                                  for p in sorted(ready, key=lambda p: p["metadata"]["name"])]}
            path = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{want['metadata']['name']}"
            try:
                have = self.api.request("GET", path)
            except ApiServerError:
                have = None
            if have is None:
                apply(self.api, want)
            elif have.get("endpoints") != want["endpoints"] or have.get("ports") != ports:
                self.api.request("PUT", path, want)


# ----------------------------------------------------------------------------- cleanup
def cleanup(state: LabState, keep_dir: bool = False) -> list[str]:
    """Remove whatever of a lab is left: namespaces, pins, agent state, and
    (unless `keep_dir`: logs and errors stay for `pcn-lab status`) its files.
    Idempotent; returns what it removed."""
    removed = []
    if state.prefix:
        for ns in pr_netns.listnetns():
            if ns.startswith(state.prefix):
                _kill_processes_in(ns)  # e.g. pod servers orphaned by a crash
                try:
                    pr_netns.remove(ns)
                    removed.append(f"netns {ns}")
                except OSError:
                    pass
        for d in (bpffs.DEFAULT_ROOT.glob(f"{state.prefix}-*") if bpffs.DEFAULT_ROOT.exists()
                  else []):
            bpffs.remove_instance(d)
            removed.append(f"pins {d}")
        for f in STATE_ROOT.glob(f"{state.prefix}-*.json") if STATE_ROOT.exists() else []:
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


def _kill_processes_in(netns: str) -> None:
    r = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                       timeout=10)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


# ----------------------------------------------------------------------------- commands
def cmd_up(args: argparse.Namespace) -> int:
    old = LabState.load(args.dir)
    if old is not None and _alive(old.supervisor_pid):
        _say(f"a lab is already running (kubeconfig {old.kubeconfig}); `pcn-lab down` first")
        return 0 if old.ready else 1
    if old is not None:
        cleanup(old)  # leftovers of a crashed lab
    run_id = secrets.token_hex(3)
    state = LabState(args.dir, run_id=run_id, nodes=args.nodes, prefix=f"pcnt-{run_id}")
    state.save()
    log_path = args.dir / "supervisor.log"
    _say(f"starting a lab with {args.nodes} node(s) and {args.pods_per_node} pod(s) per node "
         f"(run {run_id}); compiling the cubes takes a few seconds per node")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pcn_agent.lab", "--dir", str(args.dir), "_supervise",
             "--nodes", str(args.nodes), "--pods-per-node", str(args.pods_per_node)],
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
    state.supervisor_pid = proc.pid
    state.save()
    deadline = time.monotonic() + args.timeout
    last = ""
    try:
        while time.monotonic() < deadline:
            cur = LabState.load(args.dir)
            if cur is None or cur.error or proc.poll() is not None:
                err = cur.error if cur else "state vanished"
                _say(f"the lab failed to start: {err or 'supervisor exited'}; "
                     f"log: {log_path}")
                _stop_supervisor(proc.pid)
                return 1
            if cur.ready:
                break
            msg = "waiting for the agents" if not cur.api_url else "starting pods"
            if msg != last:
                _say(msg)
                last = msg
            time.sleep(0.5)
        else:
            _say(f"the lab did not become ready in {args.timeout:.0f} s; log: {log_path}")
            return 1
    except KeyboardInterrupt:
        _say("interrupted: tearing the half-built lab down")
        _stop_supervisor(proc.pid)
        cleanup(state)
        return 130
    if args.filename:
        rc = cmd_apply(argparse.Namespace(dir=args.dir, filename=args.filename))
        if rc:
            return rc
    cur = LabState.load(args.dir)
    assert cur is not None
    print(f"""pcn lab up: {cur.nodes} node(s), API server {cur.api_url}

  export KUBECONFIG={cur.kubeconfig}
  kubectl get nodes,pods -o wide
  kubectl get cubechains,networkfunctions -A
  kubectl pcn status
  pcn-lab check
  pcn-lab down""")
    return 0


def _stop_supervisor(pid: int, timeout: float = 60) -> None:
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _need_lab(d: Path) -> LabState:
    state = LabState.load(d)
    if state is None or not state.ready or not _alive(state.supervisor_pid):
        raise SystemExit("pcn-lab: no lab is running; start one with `pcn-lab up`")
    return state


def cmd_apply(args: argparse.Namespace) -> int:
    state = _need_lab(args.dir)
    api = _client(state)
    try:
        docs = load_documents(Path(args.filename))
    except (OSError, yaml.YAMLError) as exc:
        print(f"pcn-lab: cannot read {args.filename}: {exc}", file=sys.stderr)
        return 1
    from .apiserver import PLURALS

    for doc in docs:
        if doc.get("kind") not in PLURALS:
            print(f"{str(doc.get('kind')).lower()}/{(doc.get('metadata') or {}).get('name')} "
                  f"skipped (the lab serves no {doc.get('kind')} objects)")
            continue
        try:
            print(f"{doc['kind'].lower()}/{doc['metadata']['name']} {apply(api, doc)}")
        except (ApiServerError, ValueError, KeyError) as exc:
            print(f"pcn-lab: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}: {exc}",
                  file=sys.stderr)
            return 1
    return 0


def _client(state: LabState) -> EmulatedApiServer:
    api = EmulatedApiServer()
    api.url = state.api_url
    return api


def _pods(state: LabState) -> dict[str, dict[str, Any]]:
    items = _client(state).request("GET", "/api/v1/pods").get("items", [])
    return {p["metadata"]["name"]: p for p in items}


def cmd_exec(args: argparse.Namespace) -> int:
    state = _need_lab(args.dir)
    pod = _pods(state).get(args.pod)
    netns = ((pod or {}).get("metadata", {}).get("annotations") or {}).get("pcn.dev/lab-netns")
    if not netns:
        print(f"pcn-lab: no running pod {args.pod!r}; see `kubectl get pods -A`", file=sys.stderr)
        return 1
    if not args.command:
        print("pcn-lab: give a command after --, e.g. pcn-lab exec pod-1-1 -- ping -c1 10.244.2.11",
              file=sys.stderr)
        return 2
    return subprocess.call(["ip", "netns", "exec", netns, *args.command])


class _LabView:
    """What checks.* need from a lab: pods with namespaces and IPs, exec."""

    @dataclass
    class P:
        netns: str
        ip: str
        node: str

    def __init__(self, state: LabState) -> None:
        self.state = state
        self.pods = {}
        for name, p in _pods(state).items():
            netns = (p["metadata"].get("annotations") or {}).get("pcn.dev/lab-netns")
            ip = (p.get("status") or {}).get("podIP")
            if netns and ip:
                self.pods[name] = self.P(netns, ip, p["spec"].get("nodeName", ""))
        self.ext_ns = f"{state.prefix}-ext"

    def node_netns(self, name: str) -> str:
        """A lab node's own namespace is named after the node."""
        if not name.startswith(f"{self.state.prefix}-n"):
            raise KeyError(f"no pod, node or 'ext' named {name!r} in the lab")
        return name

    def exec(self, netns: str, argv: list[str], timeout: float = 30,
             check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def popen(self, netns: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", netns, *argv], **kw)


def connectivity(state: LabState) -> list[checks.CheckResult]:
    view = _LabView(state)
    api = _client(state)
    by_node: dict[str, list[str]] = {}
    for name, p in sorted(view.pods.items()):
        by_node.setdefault(p.node, []).append(name)
    nodes = sorted(by_node)
    results: list[checks.CheckResult] = []
    if not nodes:
        return results
    first = by_node[nodes[0]]
    src = first[0]
    if len(first) > 1:
        results.append(checks.ping(view, src, view.pods[first[1]].ip, f"{first[1]} (same node)"))
        results.append(checks.tcp(view, src, view.pods[first[1]].ip, f"{first[1]} (same node)"))
    # what a kubelet's probes need: the node's own stack reaches its pods
    results.append(checks.tcp(view, nodes[0], view.pods[src].ip, f"{src} (from its node)"))
    if len(nodes) > 1:
        other = by_node[nodes[1]][0]
        results.append(checks.ping(view, src, view.pods[other].ip, f"{other} (other node)"))
        results.append(checks.tcp(view, src, view.pods[other].ip, f"{other} (other node)"))
        results.append(checks.udp(view, src, view.pods[other].ip, f"{other} (other node)"))
    svcs = api.request("GET", "/api/v1/services").get("items", [])
    for s in svcs:
        spec = s.get("spec") or {}
        name = f"{s['metadata'].get('namespace', 'default')}/{s['metadata']['name']}"
        for p in (spec.get("ports") or [])[:1]:
            if (p.get("protocol") or "TCP") != "TCP":
                continue
            if spec.get("clusterIP"):
                results.append(checks.tcp(view, src, spec["clusterIP"],
                                          f"{name} ClusterIP {spec['clusterIP']}:{p['port']}",
                                          port=int(p["port"])))
            if p.get("nodePort"):
                node_ip = str(ipaddress.IPv4Network("192.168.250.0/24").network_address + 1)
                results.append(checks.tcp(view, "ext", node_ip,
                                          f"{name} NodePort node1:{p['nodePort']}",
                                          port=int(p["nodePort"])))
    with checks.servers(view, ["ext"]):
        results.append(checks.tcp(view, src, EXTERNAL_IP, "external host (egress SNAT)"))
    for r in results:
        if r.source == "ext":
            r.source = "external host"
        elif r.source in by_node:
            r.source = f"node {r.source.rsplit('-', 1)[-1]}"
    return results


def cmd_check(args: argparse.Namespace) -> int:
    state = _need_lab(args.dir)
    _say("running the connectivity matrix")
    results = connectivity(state)
    print(checks.render(results, symbols=True))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed or not results else 0


def cmd_status(args: argparse.Namespace) -> int:
    state = LabState.load(args.dir)
    if state is None:
        print("no lab (start one with `pcn-lab up`)")
        return 1
    alive = _alive(state.supervisor_pid)
    print(f"lab {state.run_id}: {'running' if alive and state.ready else 'NOT running'}"
          f"{' (error: ' + state.error + ')' if state.error else ''}")
    print(f"  API server  {state.api_url}   kubeconfig {state.kubeconfig}")
    for node, pid in sorted(state.agents.items()):
        print(f"  agent {node}: {'running' if _alive(pid) else 'stopped'} (pid {pid})")
    if alive and state.ready:
        try:
            for name, p in sorted(_pods(state).items()):
                print(f"  pod {name}: {p['spec'].get('nodeName')} "
                      f"{(p.get('status') or {}).get('podIP', '-')}")
        except Exception as exc:
            print(f"  API not reachable: {exc}")
    return 0 if alive and state.ready else 1


def cmd_down(args: argparse.Namespace) -> int:
    state = LabState.load(args.dir)
    if state is None:
        leftover = [ns for ns in pr_netns.listnetns() if ns.startswith("pcnt-")]
        print("no lab to remove" + (f" (other pcn test namespaces exist: {leftover})"
                                    if leftover else ""))
        return 0
    _say(f"stopping lab {state.run_id}")
    _stop_supervisor(state.supervisor_pid)
    for pid in state.agents.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    removed = cleanup(state)
    print(f"lab {state.run_id} removed" + (f" ({len(removed)} leftovers cleaned)"
                                           if removed else ""))
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = LabState.load(args.dir)
    if state is None:
        return 1
    state.supervisor_pid = os.getpid()
    state.save()
    asyncio.run(Supervisor(state, args.nodes, args.pods_per_node).run())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pcn-lab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=LAB_ROOT, help="lab state directory (%(default)s)")
    sub = ap.add_subparsers(dest="cmd", required=True,
                            metavar="{up,apply,exec,check,status,down}")  # not _supervise
    up = sub.add_parser("up", help="start a lab in the background")
    up.add_argument("--nodes", type=int, default=2, help="nodes (default 2)")
    up.add_argument("--pods-per-node", type=int, default=2, help="pods per node (default 2)")
    up.add_argument("-f", "--filename", help="apply this file or directory once up")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait (default 300)")
    ap_apply = sub.add_parser("apply", help="create or update objects from YAML, as kubectl apply")
    ap_apply.add_argument("-f", "--filename", required=True)
    ex = sub.add_parser("exec", help="run a command in a pod's network namespace")
    ex.add_argument("pod")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("check", help="the connectivity matrix, one row per check")
    sub.add_parser("status", help="what the lab runs")
    sub.add_parser("down", help="remove the lab, also after a crash")
    sv = sub.add_parser("_supervise", help=argparse.SUPPRESS)
    sv.add_argument("--nodes", type=int, required=True)
    sv.add_argument("--pods-per-node", type=int, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "exec" and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if os.geteuid() != 0 and args.cmd != "status":
        print("pcn-lab builds network namespaces and loads eBPF programs: run it as root "
              "(sudo)", file=sys.stderr)
        return 2
    if args.cmd == "up" and not 1 <= args.nodes <= 50:
        print("pcn-lab: --nodes must be 1-50", file=sys.stderr)
        return 2
    handlers = {"up": cmd_up, "apply": cmd_apply, "exec": cmd_exec, "check": cmd_check,
                "status": cmd_status, "down": cmd_down, "_supervise": cmd_supervise}
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
