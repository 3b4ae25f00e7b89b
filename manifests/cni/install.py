#!/usr/bin/env python3
"""Install the pcn CNI plugin on this node (the install-cni init container).

The container runtime runs CNI plugins on the host, so the plugin and its
configuration must land in the host's directories (mounted under /host):

1. the self-contained CNI runtime built by bundle.py (the image's
   /opt/pcn/cni-bundle) is copied to the host's /opt/pcn/cni/<id>/; a
   finished copy is renamed into place, so a half-copied bundle is never used;
2. /opt/cni/bin/pcn, pcn-cni's C launcher from the bundle (static: nothing
   of the host but the kernel), is replaced atomically: it hands each
   invocation to the agent over PCN_SOCKET; /opt/cni/bin/pcn-python, a small
   /bin/sh script the launcher execs when the agent cannot take an
   invocation, runs the Python plugin: the bundle's Python through the
   bundle's own dynamic loader and libraries (nothing of the host but /bin/sh).
   A bundle without a launcher (an older image) gets the script as
   /opt/cni/bin/pcn itself, as before;
3. host-local and loopback (Debian's, in the bundle) get such launchers too
   when the host has no plugin of that name; a plugin someone else installed
   is left alone, a launcher of ours is pointed at the new bundle;
4. /etc/cni/net.d/10-pcn.conflist is written last (the runtime treats the node's
   network as ready once a configuration exists), with the MTU from the
   pcn-config ConfigMap and, as the host-local range, this node's
   spec.podCIDR read from the API (host-local has no "usePodCidr" of its own);
5. bundles other than the new one and the one the old launcher used are removed.

Environment: NODE_NAME (required unless --pod-cidr), PCN_CONFIG (the mounted
ConfigMap), PCN_SOCKET (the agent's socket, the same path on the host).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CONFLIST = "10-pcn.conflist"
RETRY_S = 2.0
MARK = "# written by pcn install-cni"
LAUNCHER_BUNDLE = re.compile(r"^b=(\S+)$", re.M)


class InstallError(RuntimeError):
    pass


def launcher(bundle: str, meta: dict[str, Any], plugin: str | None = None) -> str:
    """The script running the Python plugin, /opt/cni/bin/pcn-python (the C
    launcher's fallback; /opt/cni/bin/pcn itself for a bundle without the
    launcher), or, with `plugin`, the one of a reference plugin in the
    bundle; `bundle` is the host path of the bundle."""
    what = f"CNI plugin {plugin} (Debian's containernetworking-plugins)" if plugin else \
        "pcn CNI plugin"
    run = f'"$b/cni/{plugin}"' if plugin else \
        f'"$b/{meta["python"]}" -I -S "$b/{meta["entry"]}"'
    return (
        "#!/bin/sh\n"
        f"{MARK} (manifests/cni/install.py), the init container of the\n"
        "# pcn-agent DaemonSet, at every agent start; do not edit.\n"
        f"# The {what}, run from the bundle $b through the\n"
        "# bundle's own dynamic loader and libraries: nothing of the host but /bin/sh.\n"
        f"b={bundle}\n"
        f'exec "$b/{meta["loader"]}" --library-path "$b/lib" {run} "$@"\n')


def bundle_of(bin_dir: Path) -> str | None:
    """The host path of the bundle the installed plugin uses (from its
    Python script: pcn-python, or pcn itself before the C launcher)."""
    for name in ("pcn-python", "pcn"):
        try:
            text = (bin_dir / name).read_bytes()[:4096].decode()
        except (OSError, UnicodeDecodeError):
            continue  # absent, or the launcher's ELF
        found = LAUNCHER_BUNDLE.search(text)
        if found:
            return found.group(1)
    return None


def install_launcher(bundle_src: Path, bundle: str, meta: dict[str, Any], bin_dir: Path) -> Path:
    """/opt/cni/bin/pcn (the C launcher, copied from the bundle in the image,
    `bundle_src`) and /opt/cni/bin/pcn-python (its fallback, the Python
    plugin of the installed `bundle`); without a launcher in the bundle,
    /opt/cni/bin/pcn is the Python plugin's script. Returns the plugin."""
    plugin = bin_dir / "pcn"
    if not meta.get("launcher"):
        _write_atomic(plugin, launcher(bundle, meta), 0o755)
        return plugin
    # the fallback first: a new launcher must never find an old or no script
    _write_atomic(bin_dir / "pcn-python", launcher(bundle, meta), 0o755)
    tmp = plugin.with_name(f".{plugin.name}.tmp-{os.getpid()}")
    shutil.copyfile(bundle_src / meta["launcher"], tmp)
    tmp.chmod(0o755)
    os.replace(tmp, plugin)
    return plugin


def ours(path: Path) -> bool:
    """Whether `path` is a launcher this installer wrote."""
    try:
        with path.open("rb") as f:
            return MARK.encode() in f.read(512)
    except OSError:
        return False


def conflist(pod_cidr: str, mtu: int, socket: str) -> dict[str, Any]:
    """The CNI network configuration list of pcn (libcni gives each plugin
    cniVersion and name from the list). The `portMappings` capability makes
    the runtime pass the pods' hostPorts (runtimeConfig.portMappings), which
    pcn serves in its data plane (no portmap plugin chained)."""
    return {
        "cniVersion": "1.0.0",
        "name": "pcn",
        "plugins": [{
            "type": "pcn",
            "capabilities": {"portMappings": True},
            "mtu": mtu,
            "agentSocket": socket,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": pod_cidr}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }],
    }


def node_pod_cidr(node: dict[str, Any]) -> str | None:
    """The Node's IPv4 pod CIDR (spec.podCIDRs, else spec.podCIDR), if assigned."""
    spec = node.get("spec") or {}
    for cidr in [*(spec.get("podCIDRs") or []), spec.get("podCIDR")]:
        if cidr and ipaddress.ip_network(cidr, strict=False).version == 4:
            return str(ipaddress.IPv4Network(cidr, strict=True))
    return None


def fetch_pod_cidr(node_name: str, wait_s: float) -> str:
    """Read the Node from the API, waiting for the controller manager to give
    it a pod CIDR (it does so shortly after the node registers)."""
    from pcn_agent.control.kube import discover

    ep = discover()
    url = f"{ep.server}/api/v1/nodes/{node_name}"
    headers = {"Accept": "application/json"}
    if ep.token:
        headers["Authorization"] = f"Bearer {ep.token}"
    ctx = ep.ssl_context()
    context = ctx if isinstance(ctx, ssl.SSLContext) else None
    deadline = time.monotonic() + wait_s
    last = ""
    while True:
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=10, context=context) as r:  # noqa: S310
                cidr = node_pod_cidr(json.load(r))
            if cidr:
                return cidr
            last = (f"Node {node_name} has no spec.podCIDR yet: the controller manager assigns "
                    f"one when it runs with --allocate-node-cidrs=true and --cluster-cidr")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise InstallError(f"the API refused to read Node {node_name} ({exc.code}): the "
                                   f"pcn-agent ClusterRole must allow get on nodes") from None
            last = f"GET {url}: HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = (f"cannot reach the API at {ep.server} ({exc}); without kube-proxy a "
                    f"host-network pod cannot use the kubernetes Service: set "
                    f"KUBERNETES_SERVICE_HOST/PORT to the API server's own address")
        if time.monotonic() >= deadline:
            raise InstallError(last)
        print(f"install-cni: waiting: {last}", file=sys.stderr, flush=True)
        time.sleep(RETRY_S)


def _host(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def install_bundle(src: Path, root: Path, bundle_root: str) -> tuple[str, dict[str, Any]]:
    """Copy the bundle to <bundle_root>/<id> on the host; return its host path."""
    meta = json.loads((src / "bundle.json").read_text())
    dest = _host(root, bundle_root) / meta["id"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    if (dest / "bundle.json").is_file() and \
            json.loads((dest / "bundle.json").read_text()).get("id") == meta["id"]:
        return f"{bundle_root.rstrip('/')}/{meta['id']}", meta
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.parent / f".tmp-{meta['id']}-{os.getpid()}"
    shutil.copytree(src, tmp, symlinks=True)
    os.rename(tmp, dest)
    return f"{bundle_root.rstrip('/')}/{meta['id']}", meta


def install_plugins(bundle: str, meta: dict[str, Any], bin_dir: Path) -> list[str]:
    """Launchers for the bundle's reference plugins, where the host has none."""
    written = []
    for name in meta.get("cniPlugins", []):
        dst = bin_dir / name
        if (dst.exists() or dst.is_symlink()) and not ours(dst):
            continue  # the host's own (e.g. from kubernetes-cni): keep it
        _write_atomic(dst, launcher(bundle, meta, name), 0o755)
        written.append(name)
    return written


def prune(bundles: Path, keep: set[str]) -> list[str]:
    removed = []
    for p in sorted(bundles.iterdir()):
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host-root", type=Path, default=Path("/host"),
                    help="where the host's file system is mounted (default %(default)s)")
    ap.add_argument("--bundle", type=Path, default=Path("/opt/pcn/cni-bundle"),
                    help="the bundle in the image (default %(default)s)")
    ap.add_argument("--bundle-root", default="/opt/pcn/cni",
                    help="host directory of installed bundles (default %(default)s)")
    ap.add_argument("--cni-bin-dir", default="/opt/cni/bin", help="host CNI_PATH directory")
    ap.add_argument("--cni-conf-dir", default="/etc/cni/net.d", help="host CNI config directory")
    ap.add_argument("--config", type=Path, default=Path(os.environ.get("PCN_CONFIG",
                                                                        "/etc/pcn/config")),
                    help="pcn-config ConfigMap directory or JSON file (default $PCN_CONFIG)")
    ap.add_argument("--socket", default=os.environ.get("PCN_SOCKET", "/run/pcn/agent.sock"),
                    help="the agent's socket (default $PCN_SOCKET or %(default)s)")
    ap.add_argument("--node", default=os.environ.get("NODE_NAME", ""),
                    help="this node's name (default $NODE_NAME)")
    ap.add_argument("--pod-cidr", help="this node's pod CIDR (default: read the Node from the API)")
    ap.add_argument("--wait", type=float, default=600.0,
                    help="seconds to wait for the Node's pod CIDR (default %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    from pcn_agent.control.settings import ClusterSettings

    try:
        settings = ClusterSettings.load(args.config)
        if args.pod_cidr:
            pod_cidr = str(ipaddress.IPv4Network(args.pod_cidr, strict=True))
        elif args.node:
            pod_cidr = fetch_pod_cidr(args.node, args.wait)
        else:
            raise InstallError("NODE_NAME is not set (the DaemonSet passes spec.nodeName)")
        if not ipaddress.IPv4Network(pod_cidr).subnet_of(ipaddress.IPv4Network(settings.podCIDR)):
            raise InstallError(f"this node's pod CIDR {pod_cidr} is outside the cluster's "
                               f"{settings.podCIDR}: set podCIDR in the pcn-config ConfigMap to "
                               f"the controller manager's --cluster-cidr")
        root = args.host_root
        bin_dir = _host(root, args.cni_bin_dir)
        conf_dir = _host(root, args.cni_conf_dir)
        bin_dir.mkdir(parents=True, exist_ok=True)
        conf_dir.mkdir(parents=True, exist_ok=True)

        bundle, meta = install_bundle(args.bundle, root, args.bundle_root)
        old = bundle_of(bin_dir)
        copied = install_plugins(bundle, meta, bin_dir)
        plugin = install_launcher(args.bundle, bundle, meta, bin_dir)
        conf = conflist(pod_cidr, settings.pod_mtu, args.socket)
        _write_atomic(conf_dir / CONFLIST, json.dumps(conf, indent=2) + "\n", 0o644)
        keep = {meta["id"]} | ({Path(old).name} if old else set())
        removed = prune(_host(root, args.bundle_root), keep)
    except (InstallError, OSError, ValueError) as exc:
        print(f"install-cni: {exc}", file=sys.stderr)
        return 1

    print(f"install-cni: {plugin} -> {bundle} (Python {meta['pythonVersion']}"
          f"{', C launcher' if meta.get('launcher') else ''}); "
          f"{conf_dir / CONFLIST}: pod CIDR {pod_cidr}, MTU {settings.pod_mtu}"
          + (f"; launchers for {', '.join(copied)}" if copied else "")
          + (f"; removed old bundles {', '.join(removed)}" if removed else ""))
    others = sorted(p.name for p in conf_dir.iterdir()
                    if p.suffix in (".conf", ".conflist", ".json") and p.name != CONFLIST)
    if others and others[0] < CONFLIST:
        print(f"install-cni: warning: {conf_dir} also holds {', '.join(others)}; the runtime "
              f"uses the first file by name, {others[0]}, not {CONFLIST}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
