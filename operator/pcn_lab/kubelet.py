"""A kubelet stand-in for labs and tests: gives a pod a network namespace and
runs the real `pcn-cni` plugin exactly as a container runtime does
(environment + network configuration on stdin, inside the node's network
namespace), with host-local IPAM from Debian's containernetworking-plugins.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import netns as pr_netns

CNI_PATH = os.environ.get("PCN_CNI_PATH", "/usr/lib/cni:/opt/cni/bin")


class CniError(RuntimeError):
    def __init__(self, command: str, result: dict[str, Any], stderr: str) -> None:
        super().__init__(f"CNI {command} failed (code {result.get('code')}): {result.get('msg')}"
                         f"{' - ' + str(result['details']) if result.get('details') else ''}"
                         f"{' / ' + stderr.strip()[-200:] if stderr.strip() else ''}")
        self.result = result


PLUGINS = ("launcher", "python")


def python_plugin() -> list[str]:
    """The Python plugin (the reference implementation): the package's entry
    point on this Python with -I -S, as the image's CNI bundle starts it
    (manifests/cni/bundle.py; pcn_agent/cni/__main__.py says why). The
    `pcn-cni` console script runs the same code, ~10 ms slower to start."""
    from pcn_agent.cni import __file__ as package_init

    return [sys.executable, "-I", "-S", str(Path(package_init).with_name("__main__.py"))]


def cni_launcher() -> Path:
    """pcn-cni's C launcher, built from the source tree into this Python's
    prefix (the virtualenv: <prefix>/lib/pcn-cni/pcn, rebuilt when
    launcher.c is newer), with <prefix>/lib/pcn-cni/pcn-python, its
    fallback, running python_plugin()."""
    from pcn_agent.cni import launcher

    exe = launcher.compile_launcher(Path(sys.prefix) / "lib" / "pcn-cni" / "pcn")
    launcher.write_fallback(exe, python_plugin())
    return exe


def cni_binary(plugin: str | None = None) -> list[str]:
    """The plugin as the node runs it: "launcher" (the default: the C
    launcher the image installs as /opt/cni/bin/pcn, handing each invocation
    to the agent) or "python" (the reference plugin run on its own);
    PCN_CNI_PLUGIN in the environment chooses when `plugin` is None."""
    plugin = plugin or os.environ.get("PCN_CNI_PLUGIN") or "launcher"
    if plugin == "python":
        return python_plugin()
    if plugin == "launcher":
        return [str(cni_launcher())]
    raise ValueError(f"PCN_CNI_PLUGIN={plugin!r}: expected one of {', '.join(PLUGINS)}")


def network_config(pod_cidr: str, gateway: str, socket_path: str, data_dir: str, mtu: int,
                   name: str = "pcn") -> dict[str, Any]:
    net = ipaddress.IPv4Network(pod_cidr)
    return {
        "cniVersion": "1.0.0", "name": name, "type": "pcn", "mtu": mtu,
        "capabilities": {"portMappings": True}, "agentSocket": socket_path,
        "ipam": {"type": "host-local", "dataDir": data_dir,
                 "ranges": [[{"subnet": str(net), "gateway": gateway,
                              "rangeStart": str(net.network_address + 10)}]],
                 "routes": [{"dst": "0.0.0.0/0"}]},
    }


@dataclass
class PodSandbox:
    namespace: str  # Kubernetes namespace
    name: str
    container_id: str
    netns: str  # network namespace name (under /var/run/netns)
    ip: str = ""


def run_cni(node_netns: str | None, command: str, sandbox: PodSandbox, config: dict[str, Any],
            ifname: str = "eth0", timeout: float = 30,
            extra_env: dict[str, str] | None = None,
            plugin: str | None = None) -> dict[str, Any]:
    """Run the plugin once (inside `node_netns` if given) as a runtime does;
    its result, or CniError. `extra_env`: more variables for the plugin
    (PCN_CNI_TRACE in the benchmarks); `plugin`: as cni_binary's."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command, "CNI_CONTAINERID": sandbox.container_id,
        "CNI_NETNS": f"/var/run/netns/{sandbox.netns}", "CNI_IFNAME": ifname,
        # As the kubelet (CRI) sets them: IgnoreUnknown lets IPAM plugins skip the K8S_ keys.
        "CNI_ARGS": (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={sandbox.namespace};"
                     f"K8S_POD_NAME={sandbox.name};K8S_POD_INFRA_CONTAINER_ID={sandbox.container_id}"),
        "CNI_PATH": CNI_PATH,
        **(extra_env or {}),
    }
    prefix = ["ip", "netns", "exec", node_netns] if node_netns else []
    r = subprocess.run([*prefix, *cni_binary(plugin)], input=json.dumps(config), env=env,
                       capture_output=True, text=True, timeout=timeout)
    out = json.loads(r.stdout) if r.stdout.strip() else {}
    if r.returncode != 0:
        raise CniError(command, out or {"msg": "no output"}, r.stderr)
    return out


def port_mappings(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod's hostPorts as kubelet and containerd hand them to CNI: one
    entry per spec.containers[].ports[] with a hostPort (containerd's
    toCNIPortMappings: protocol lower-cased, hostIP as given, "" when none),
    with go-cni's field names as JSON keys ("HostPort", ...: its PortMapping
    struct has no JSON tags), which is what a real containerd sends."""
    out: list[dict[str, Any]] = []
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if isinstance(p.get("hostPort"), int) and p["hostPort"] > 0:
                out.append({"HostPort": p["hostPort"], "ContainerPort": p.get("containerPort"),
                            "Protocol": (p.get("protocol") or "TCP").lower(),
                            "HostIP": p.get("hostIP") or ""})
    return out


def with_capabilities(config: dict[str, Any], mappings: list[dict[str, Any]]) -> dict[str, Any]:
    """The plugin's configuration with runtimeConfig for the capabilities it
    declares, as libcni injects it (only portMappings here; none: unchanged)."""
    if not mappings or not (config.get("capabilities") or {}).get("portMappings"):
        return config
    return {**config, "runtimeConfig": {"portMappings": mappings}}


def start_pod(node_netns: str | None, sandbox: PodSandbox, config: dict[str, Any],
              mappings: list[dict[str, Any]] | None = None) -> PodSandbox:
    """Create the pod's namespace and run CNI ADD (with the pod's hostPorts,
    `port_mappings(pod)`); on failure nothing is left."""
    pr_netns.create(sandbox.netns)
    try:
        result = run_cni(node_netns, "ADD", sandbox, with_capabilities(config, mappings or []))
        sandbox.ip = str(ipaddress.IPv4Interface(result["ips"][0]["address"]).ip)
        return sandbox
    except BaseException:
        pr_netns.remove(sandbox.netns)
        raise


def stop_pod(node_netns: str | None, sandbox: PodSandbox, config: dict[str, Any]) -> None:
    """CNI DEL, then every process in the pod's namespace is killed, as
    kubelet stops a pod's containers (a daemon started in it with `pcn-lab
    exec`, e.g. `iperf3 -D`, outlived the pod and the lab), then the
    namespace goes."""
    try:
        run_cni(node_netns, "DEL", sandbox, config)
    finally:
        kill_netns_processes(netns_inodes([sandbox.netns]))
        if sandbox.netns in pr_netns.listnetns():
            pr_netns.remove(sandbox.netns)


def netns_inodes(names: list[str]) -> set[int]:
    """The inodes of the named network namespaces (/var/run/netns/NAME, a
    bind mount of the namespace's nsfs file) that exist. A process is in the
    namespace whose inode its /proc/PID/ns/net has, named or not: `ip netns
    pids` compares the same."""
    out = set()
    for name in names:
        try:
            out.add(os.stat(f"{pr_netns.NETNS_RUN_DIR}/{name}").st_ino)
        except OSError:
            pass
    return out


def kill_netns_processes(inodes: set[int]) -> list[int]:
    """SIGKILL every process (but this one) whose network namespace is one of
    `inodes` (netns_inodes); the pids killed. A namespace whose name was
    removed lives on while a process is in it, so the inodes are taken
    before the names go."""
    if not inodes:
        return []
    killed = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino not in inodes:
                continue
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
        except (OSError, ValueError):
            pass  # gone meanwhile, or a kernel thread
    return killed


def container_ports(pod: dict[str, Any], tcp: int, udp: int) -> tuple[list[int], list[int]]:
    """The (TCP, UDP) ports a lab pod listens on: those its containers
    declare (spec.containers[].ports, as the real containers would listen on
    them) and always `tcp` and `udp`, the probe's; sorted. SCTP ports are
    not served."""
    t, u = {tcp}, {udp}
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            proto = (p.get("protocol") or "TCP").upper()
            if isinstance(p.get("containerPort"), int):
                (t if proto == "TCP" else u if proto == "UDP" else set()).add(p["containerPort"])
    return sorted(t), sorted(u)


def pod_object(sandbox: PodSandbox, node: str, labels: dict[str, str]) -> dict[str, Any]:
    """The Pod as the API server holds it once the kubelet reports it running."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": sandbox.name, "namespace": sandbox.namespace,
                         "labels": labels, "uid": sandbox.container_id},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "probe"}]},
            "status": {"phase": "Running", "podIP": sandbox.ip, "podIPs": [{"ip": sandbox.ip}]}}
