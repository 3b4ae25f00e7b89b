"""`pcn-lab up --kubernetes`: a real cluster on this machine, step by step.

1. certificates and kubeconfigs (pki, kubeconfig);
2. the network: one namespace per node on the lab's switch
   (pcn_lab.topology.Lab without its data plane), node 1 the control plane;
3. per node: its folders, its cgroup root in every v1 hierarchy, and the
   holder of its mount namespace (node, holder);
4. control plane on node 1: etcd, kube-apiserver, the relay that makes it
   reachable on 127.0.0.1 of the root namespace, kube-controller-manager,
   kube-scheduler (controlplane, relay);
5. per node: containerd, every image archive imported into it, kubelet
   (containerd, kubeletconf);
6. pcn as users install it (`kubectl apply -k`, install), every node Ready,
   CoreDNS as kube-dns Ready; then the user's files (`-f`).

`until` stops after a step ("controlplane", "nodes", "pcn") with the
cluster left running. Every step prints a progress line and saves the
state, so `pcn-lab down` removes a half-built cluster too.
"""

from __future__ import annotations

import functools
import json
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from pcn_lab.cluster import (
    artifacts,
    cleanup,
    containerd,
    controlplane,
    install,
    kubeconfig,
    kubectl,
    kubeletconf,
    node,
    pki,
    runner,
)
from pcn_lab.cluster.layout import API_PORT, Layout
from pcn_lab.cluster.runner import say
from pcn_lab.cluster.state import ClusterState, orphans
from pcn_lab.manifests import cluster_scoped, manifest_targets
from pcn_lab.topology import Lab

CONTROL_PLANE_BINARIES = ("etcd", "etcdctl", "kube-apiserver", "kube-controller-manager",
                          "kube-scheduler", "kubectl")
NODE_BINARIES = ("kubelet", "containerd", "containerd-shim-runc-v2", "ctr", "runc")
STAGES = ("controlplane", "nodes", "pcn", "all")


def missing_binaries(until: str) -> list[str]:
    need = CONTROL_PLANE_BINARIES + (NODE_BINARIES if until != "controlplane" else ())
    return [b for b in need if not (artifacts.bin_dir() / b).is_file()]


class Bringup:
    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.layout: Layout = state.layout
        self.bin = artifacts.bin_dir()
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ helpers
    def step(self, name: str, msg: str) -> None:
        self.state.step = name
        self.state.save()
        say(f"[{time.monotonic() - self.t0:5.1f} s] {msg}")

    def env(self) -> dict[str, str]:
        return runner.environment(self.layout, self.bin)

    def start_in(self, node_name: str, name: str, argv: list[str]) -> int:
        holder = self.state.holders[node_name]
        return runner.start(self.layout, name, runner.in_node(holder, argv), self.env())

    def dead(self, name: str) -> str | None:
        pid = runner.pid_of(self.layout, name)
        if pid is not None and not runner.alive(pid):
            return (f"{name} exited; last lines of {self.layout.logs / (name + '.log')}:\n"
                    f"{runner.log_tail(self.layout, name)}")
        return None

    def node_ok(self, node_name: str, argv: list[str]) -> bool:
        r = subprocess.run(runner.in_node(self.state.holders[node_name], argv),
                           capture_output=True, timeout=30, env=self.env())
        return r.returncode == 0

    @property
    def kcfg(self) -> Path:
        return self.state.kubeconfig

    # ------------------------------------------------------------------ steps
    def run(self, until: str = "all", filename: Path | None = None) -> None:
        self.prepare()
        self.network()
        self.nodes_namespaces()
        self.control_plane()
        if until == "controlplane":
            return
        self.node_daemons()
        if until == "nodes":
            return
        self.pcn()
        if until == "pcn":
            return
        if filename is not None:
            self.apply_user(filename)

    def prepare(self) -> None:
        lay = self.layout
        self.step("pki", f"cluster {lay.prefix}: certificates and kubeconfigs in {lay.data}")
        lay.data.mkdir(parents=True, exist_ok=True)
        made = pki.generate(lay)
        kubeconfig.write_all(lay)
        say(f"  {len(made)} keys and certificates (openssl, one CA)")

    def network(self) -> None:
        lay = self.layout
        self.step("network", f"network: {len(lay.nodes)} node namespaces on the lab switch "
                              f"{lay.prefix}-phy (control plane {lay.control_plane}, "
                              f"{lay.api_ip})")
        Lab(nodes_count=len(lay.nodes), pods_per_node=0, dataplane=False,
            run_id=lay.run_id).build()

    def nodes_namespaces(self) -> None:
        lay = self.layout
        self.step("mounts", "nodes: folders, cgroup roots and mount namespaces")
        self.state.created_mountpoints = node.create_mountpoints()
        self.state.save()
        cgroups = node.cgroup_mounts(Path("/proc/1/mountinfo").read_text())
        for n in lay.nodes:
            for d in node.node_folders(lay, n):
                d.mkdir(parents=True, exist_ok=True)
            node.create_cgroups(node.cgroup_dirs(lay, n, cgroups))
            plan = lay.config_dir(n) / "mounts.json"
            plan.write_text(json.dumps(node.mount_plan(lay, n, cgroups), indent=1))
            ready = lay.config_dir(n) / "holder.ready"
            ready.unlink(missing_ok=True)
            runner.start(lay, f"holder-{n}",
                         ["ip", "netns", "exec", n, sys.executable, "-m",
                          "pcn_lab.cluster.holder", str(plan), str(ready)], self.env())
        for n in lay.nodes:
            ready = lay.config_dir(n) / "holder.ready"

            def held(r: Path = ready) -> bool:
                return r.is_file() and r.read_text().strip().isdigit()

            def failed(r: Path = ready, n: str = n) -> str | None:
                return r.read_text().strip() if r.is_file() else self.dead(f"holder-{n}")

            runner.wait_for(f"the mount namespace of {n}", held, 30, failed, 0.1)
            self.state.holders[n] = int(ready.read_text())
        self.state.save()

    def control_plane(self) -> None:
        lay, cp = self.layout, self.layout.control_plane
        self.step("etcd", "control plane: etcd (TLS, client certificates)")
        self.start_in(cp, "etcd", controlplane.etcd_argv(lay, self.bin))
        took = runner.wait_for(
            "etcd", lambda: self.node_ok(cp, controlplane.etcdctl_health_argv(lay, self.bin)),
            60, lambda: self.dead("etcd"))
        say(f"  etcd healthy in {took:.1f} s")
        self.step("apiserver", f"control plane: kube-apiserver on {lay.api_ip}:{API_PORT} "
                               "(Node,RBAC; NodeRestriction)")
        self.start_in(cp, "kube-apiserver", controlplane.apiserver_argv(lay, self.bin))
        port_file = lay.data / "relay.port"
        port_file.unlink(missing_ok=True)
        runner.start(lay, "relay", [sys.executable, "-m", "pcn_lab.cluster.relay",
                                    "--netns", cp, "--target", f"127.0.0.1:{API_PORT}",
                                    "--port-file", str(port_file)], self.env())
        runner.wait_for("the API relay", lambda: port_file.is_file() and port_file.read_text()
                        .strip().isdigit(), 20, lambda: self.dead("relay"), 0.1)
        self.state.relay_port = int(port_file.read_text())
        kubeconfig.write(self.kcfg, kubeconfig.for_cert(
            lay, "admin", f"https://127.0.0.1:{self.state.relay_port}", self.state.namespace))
        self.state.save()
        took = runner.wait_for("kube-apiserver /readyz",
                               lambda: kubectl.ok(self.kcfg, "get", "--raw", "/readyz"), 120,
                               lambda: self.dead("kube-apiserver"), 1.0)
        say(f"  API server ready in {took:.1f} s; kubectl: https://127.0.0.1:"
            f"{self.state.relay_port} ({self.kcfg})")
        self.step("controllers", "control plane: kube-controller-manager (node CIDRs "
                                 "10.244.0.0/16, /24 each), kube-scheduler")
        self.start_in(cp, "kube-controller-manager",
                      controlplane.controller_manager_argv(lay, self.bin))
        self.start_in(cp, "kube-scheduler", controlplane.scheduler_argv(lay, self.bin))
        for name, port in (("kube-controller-manager", 10257), ("kube-scheduler", 10259)):
            runner.wait_for(name, functools.partial(
                self.node_ok, cp, ["curl", "-sfk", f"https://127.0.0.1:{port}/healthz"]), 60,
                functools.partial(self.dead, name), 1.0)
        say("  controller manager and scheduler healthy")

    def others(self) -> list[ClusterState]:
        """The other clusters of this machine that are still up (their data
        folder is there): they share the host's sysctls and mount points."""
        return [o for o in orphans(self.layout.data.parent)
                if o.layout.prefix != self.layout.prefix and o.alive()]

    def agent_image(self) -> None:
        """The pcn-agent image of this checkout's code: `make k8s` built it
        from the code of its day, and a cluster brought up after a change
        (or from another checkout sharing the cache) must run the code it is
        brought up from, not that one. Rebuilt only when its inputs changed
        (about a minute; a second otherwise)."""
        from pcn_lab.cluster import images

        started = time.monotonic()
        images.build_images(only=["pcn-agent"])
        took = time.monotonic() - started
        if took > 5:
            say(f"  pcn-agent image rebuilt from this checkout in {took:.0f} s (its code "
                "changed since it was last built)")

    def node_daemons(self) -> None:
        lay = self.layout
        self.agent_image()
        entries = install.images(artifacts.image_dir())
        pause = install.pause_ref(entries)
        if not containerd.can_lower_oom_score():
            say("  no CAP_SYS_RESOURCE here: containerd keeps containers' oom_score_adj at "
                "or above its own (restrict_oom_score_adj)")
        self.step("containerd", f"nodes: containerd on {len(lay.nodes)} nodes (sandbox image "
                                f"{pause}, NRI off)")
        for n in lay.nodes:
            cfg = lay.config_dir(n) / "containerd.toml"
            cfg.write_text(containerd.to_toml(containerd.config(
                lay, n, pause, self.bin / "runc",
                restrict_oom_score_adj=not containerd.can_lower_oom_score())))
            self.start_in(n, f"containerd-{n}", [str(self.bin / "containerd"), "--config",
                                                 str(cfg)])
        for n in lay.nodes:
            sock = lay.containerd_socket(n)
            runner.wait_for(f"containerd on {n}", sock.exists, 60,
                            functools.partial(self.dead, f"containerd-{n}"), 0.2)
        self.step("images", f"nodes: importing {len(entries)} image archives into every "
                            f"node's containerd ({', '.join(e['ref'] for e in entries)})")
        t = time.monotonic()
        with ThreadPoolExecutor(len(lay.nodes)) as pool:
            list(pool.map(lambda n: install.import_images(
                self.bin / "ctr", lay.containerd_socket(n), artifacts.image_dir(), entries),
                lay.nodes))
        say(f"  imported in {time.monotonic() - t:.1f} s")
        if not self.state.sysctls:
            self.state.sysctls = cleanup.host_sysctls(self.others())
            self.state.save()
        self.step("kubelet", "nodes: kubelets (cgroupfs, cgroup root /<node>, cgroup v1)")
        for n in lay.nodes:
            cfg = lay.config_dir(n) / "kubelet.yaml"
            cfg.write_text(yaml.safe_dump(kubeletconf.config(lay, n), sort_keys=False))
            self.start_in(n, f"kubelet-{n}", kubeletconf.argv(lay, n, self.bin, cfg))

        def registered() -> bool:
            r = kubectl.run(self.kcfg, "get", "nodes", "-o", "name", check=False)
            return len(r.stdout.split()) == len(lay.nodes)

        def kubelet_dead() -> str | None:
            for n in lay.nodes:
                why = self.dead(f"kubelet-{n}")
                if why:
                    return why
            return None

        took = runner.wait_for("every kubelet to register its Node", registered, 120,
                               kubelet_dead, 1.0)
        say(f"  {len(lay.nodes)} nodes registered in {took:.1f} s (NotReady until pcn's "
            "CNI is installed)")
        kubectl.run(self.kcfg, "label", "node", lay.control_plane, "--overwrite",
                    "node-role.kubernetes.io/control-plane=")

    def pcn(self) -> None:
        lay = self.layout
        root = install.repo_root()
        source = Path(self.state.agent_source) if self.state.agent_source else None
        overlay = install.write_overlay(lay, root / "manifests", source)
        if source is not None:
            say(f"  the agent runs pcn_agent, pcn_bpf and pcn_crds from {source} (not the "
                "image's)")
        self.step("pcn", f"pcn: kubectl apply -k manifests/ (through {overlay}: "
                         f"KUBERNETES_SERVICE_HOST={lay.api_ip} for the agent, no kube-proxy)")
        out = kubectl.run(self.kcfg, "apply", "-k", str(overlay)).stdout
        say(f"  {len(out.splitlines())} objects applied")
        t = time.monotonic()

        def agents() -> bool:
            ds = kubectl.get(self.kcfg, "-n", "pcn-system", "daemonset", "pcn-agent")
            st = ds.get("status") or {}
            return (st.get("desiredNumberScheduled") == len(lay.nodes)
                    and st.get("numberReady") == len(lay.nodes))

        runner.wait_for("pcn-agent Ready on every node", agents, 600, None, 2.0)
        runner.wait_for("every node Ready", lambda: kubectl.ok(
            self.kcfg, "wait", "--for=condition=Ready", "nodes", "--all", "--timeout=5s"),
            300, None, 1.0)
        say(f"  pcn-agent Ready and every node Ready in {time.monotonic() - t:.1f} s")
        self.step("coredns", "CoreDNS as kube-dns (10.96.0.10, offline Corefile)")
        kubectl.run(self.kcfg, "apply", "-f", str(install.COREDNS))
        t = time.monotonic()
        runner.wait_for("CoreDNS Ready", lambda: kubectl.ok(
            self.kcfg, "-n", "kube-system", "rollout", "status", "deployment/coredns",
            "--timeout=5s"), 300, None, 1.0)
        say(f"  CoreDNS Ready in {time.monotonic() - t:.1f} s")

    def apply_user(self, path: Path) -> None:
        """Apply a file or a folder as the emulated lab does
        (pcn_lab.manifests.manifest_targets: YAML files with -f,
        kustomizations such as examples/argocd with -k, other sub-folders
        such as examples/cubetypes by the same rules), then wait for their pods."""
        self.step("apply", f"applying {path}")
        targets = manifest_targets(path)
        namespaces = set()
        for flag, p in targets:
            print(kubectl.run(self.kcfg, "apply", flag, str(p)).stdout, end="")
            if flag == "-f":
                for doc in yaml.safe_load_all(p.read_text()):
                    if doc and doc.get("kind") != "Namespace" and \
                            not cluster_scoped(doc.get("kind")):  # a CubeType's
                        namespaces.add((doc.get("metadata") or {}).get("namespace") or "default")
        if len(namespaces) == 1:
            self.state.namespace = namespaces.pop()
            kubeconfig.write(self.kcfg, kubeconfig.for_cert(
                self.layout, "admin", f"https://127.0.0.1:{self.state.relay_port}",
                self.state.namespace))
            self.state.save()
        runner.wait_for("the applied pods Ready", lambda: kubectl.ok(
            self.kcfg, "wait", "--for=condition=Ready", "pods", "--all", "-A",
            "--timeout=5s"), 300, None, 1.0)


def up(state_dir: Path, workers: int, until: str = "all", filename: Path | None = None,
       data_root: Path | None = None, agent_source: Path | None = None) -> ClusterState:
    """Bring a cluster up (see the module's doc); on failure the state keeps
    the error and the cluster stays for inspection (`pcn-lab down` removes it)."""
    missing = missing_binaries(until)
    if missing:
        raise FileNotFoundError(f"{artifacts.bin_dir()} lacks {', '.join(missing)}: run "
                                "`make k8s` first")
    state = ClusterState(state_dir, run_id=secrets.token_hex(3), workers=workers)
    if data_root is not None:
        state.data_root = str(data_root)
    if agent_source is not None:
        state.agent_source = str(agent_source.resolve())
    state.save()
    b = Bringup(state)
    try:
        b.run(until, filename)
    except BaseException as exc:
        state.error = f"{state.step}: {exc}"
        state.save()
        raise
    state.ready = True
    state.step = "ready" if until == "all" else until
    state.save()
    say(f"[{time.monotonic() - b.t0:5.1f} s] cluster {state.layout.prefix} up")
    return state
