"""The upstream kube-proxy as the services reference: a bench-owned control
plane (etcd + kube-apiserver from `make k8s`'s cache) and kube-proxy itself,
in `iptables` or `nftables` mode, inside a reference node's namespace.

Where things run (nothing is added to the root namespace's network):

* etcd and kube-apiserver in a namespace of their own (`<prefix>-kpapi`), on
  its loopback, with ports picked here and a data directory under the run's
  temporary directory; the API server's serving certificate is self-signed
  (`--cert-dir`), clients authenticate with a static token of the
  `system:masters` group and authorization is AlwaysAllow (a bench cluster,
  never reachable from outside the machine).
* a TCP relay (`pcn_lab.cluster.relay`) from 127.0.0.1 of the root namespace
  to the API server, for the bench's own client (`ApiClient`), and one from
  127.0.0.1 of each node namespace, for that node's kube-proxy.
* kube-proxy in the node namespace (`ip netns exec`), with a
  KubeProxyConfiguration file (`proxy_config`, kubeproxy.config.k8s.io/v1alpha1:
  the mode, `clusterCIDR`, `hostnameOverride`, metrics and healthz on that
  namespace's loopback, conntrack sysctls left alone) and a kubeconfig
  (`kubeconfig`). kube-proxy ignores the flags its file also sets
  (`kube-proxy --help`: "This parameter is ignored if a config file is
  specified by --config"), so everything is in the file and only
  `--hostname-override` is repeated on the command line.

The Services and EndpointSlices are created through the API (`service_objects`
renders them: a selector-less ClusterIP Service with the address fixed and one
EndpointSlice labelled `kubernetes.io/service-name`, as the EndpointSlice
controller would write it), so kube-proxy programs them exactly as in a
cluster. Readiness (`missing`) reads the rules kube-proxy wrote in the node's
namespace: in iptables mode `iptables-save -t nat` must have, for every
ClusterIP:port, the KUBE-SERVICES jump to its KUBE-SVC chain (kube-proxy only
writes it once the service has endpoints, pkg/proxy/iptables/proxier.go) and
for every endpoint a KUBE-SEP chain jumped to from it whose DNAT goes to the
endpoint;
in nftables mode `nft list table ip kube-proxy` must have the
`ip . proto . port : goto service-...` element of the `service-ips` map and,
in that service's chain, each endpoint: `dnat to ip:port` when it is the only
one, `ip . port` in the `dnat ip to numgen random mod N map {...}` of several
(v1.37), or `goto endpoint-...__ip/port` when they need chains of their own
(pkg/proxy/nftables/proxier.go).
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netns import exec_in, stop

log = logging.getLogger(__name__)

MODES = ("iptables", "nftables")
TOKEN = "pcn-bench-token"  # static token of the bench's own API server (loopback only)
SERVICE_CIDR = "10.96.0.0/12"  # the API server's service range: every VIP of the bench is in it
NFT_TABLE = "kube-proxy"  # kube-proxy's nftables table (family ip for IPv4)
# end of kube-proxy's last rules sync, Unix seconds (pkg/proxy/metrics/metrics.go)
SYNC_TIMESTAMP = 'kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}'


@dataclass(frozen=True)
class ServicePort:
    """One port of a ClusterIP Service and its endpoints, as kube-proxy sees it."""

    namespace: str
    name: str
    port_name: str
    cluster_ip: str
    port: int
    protocol: str  # "tcp" or "udp"
    endpoints: tuple[tuple[str, int], ...]  # (pod IP, target port)

    @property
    def port_id(self) -> str:
        """kube-proxy's ServicePortName string: namespace/name:port."""
        return f"{self.namespace}/{self.name}:{self.port_name}"


def free_port() -> int:
    """A TCP port free on this namespace's loopback now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kubeconfig(server: str, token: str = TOKEN) -> dict[str, Any]:
    """A kubeconfig for `server` (https://127.0.0.1:PORT) with a bearer token;
    the server's certificate is not verified (self-signed, loopback only)."""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": server,
                                                   "insecure-skip-tls-verify": True}}],
        "users": [{"name": "bench", "user": {"token": token}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
    }


def proxy_config(mode: str, hostname: str, cluster_cidr: str, kubeconfig_path: Path,
                 metrics_port: int, healthz_port: int) -> dict[str, Any]:
    """A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1, the fields
    of k8s.io/kube-proxy/config/v1alpha1/types.go).

    `mode` is "iptables" or "nftables"; `clusterCIDR` with detectLocalMode
    ClusterCIDR makes traffic from outside it masqueraded, as in a cluster;
    minSyncPeriod 0 programs every change at once (the default 1 s would
    delay the readiness of the rules, not change them). Conntrack: maxPerCore
    0 and zero timeouts leave the kernel's values alone (nf_conntrack_max is
    machine-wide; the others are the node namespace's own but the pcn variant
    runs with the defaults too). Raises ValueError for another mode."""
    if mode not in MODES:
        raise ValueError(f"kube-proxy mode {mode!r}: the bench runs {' and '.join(MODES)}")
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": mode,
        "hostnameOverride": hostname,
        "clusterCIDR": cluster_cidr,
        "detectLocalMode": "ClusterCIDR",
        "clientConnection": {"kubeconfig": str(kubeconfig_path), "qps": 1000, "burst": 2000},
        "bindAddress": "127.0.0.1",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "iptables": {"minSyncPeriod": "0s", "syncPeriod": "30s", "masqueradeAll": False},
        "nftables": {"minSyncPeriod": "0s", "syncPeriod": "30s", "masqueradeAll": False},
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
    }


def service_objects(ports: Sequence[ServicePort]) -> list[dict[str, Any]]:
    """Service and EndpointSlice objects (API JSON) for `ports`, grouped by
    (namespace, name): one selector-less ClusterIP Service per name with
    `clusterIP` fixed, and its EndpointSlice (discovery.k8s.io/v1, addressType
    IPv4, every endpoint ready, one port entry per service port with its
    target port). The ports of one Service must share their endpoint
    addresses (an EndpointSlice lists addresses once for all its ports):
    raises ValueError otherwise, or when they disagree on the ClusterIP."""
    groups: dict[tuple[str, str], list[ServicePort]] = {}
    for sp in ports:
        groups.setdefault((sp.namespace, sp.name), []).append(sp)
    out: list[dict[str, Any]] = []
    for (ns, name), sps in groups.items():
        ips = {sp.cluster_ip for sp in sps}
        addrs = [tuple(ip for ip, _ in sp.endpoints) for sp in sps]
        if len(ips) != 1 or len(set(addrs)) != 1:
            raise ValueError(f"{ns}/{name}: ports disagree on the ClusterIP or the endpoint "
                             f"addresses ({sorted(ips)}, {addrs})")
        targets = [{sp.endpoints[0][1] if sp.endpoints else sp.port} for sp in sps]
        for sp, t in zip(sps, targets, strict=True):
            if len({p for _, p in sp.endpoints} | t) != 1:
                raise ValueError(f"{sp.port_id}: endpoints on different target ports")
        out.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "ClusterIP", "clusterIP": sps[0].cluster_ip,
                     "clusterIPs": [sps[0].cluster_ip],
                     "ports": [{"name": sp.port_name, "port": sp.port,
                                "targetPort": next(iter(t)), "protocol": sp.protocol.upper()}
                               for sp, t in zip(sps, targets, strict=True)]},
        })
        out.append(endpoint_slice(ns, name, addrs[0],
                                  [(sp.port_name, next(iter(t)), sp.protocol)
                                   for sp, t in zip(sps, targets, strict=True)]))
    return out


def endpoint_slice(namespace: str, service: str, addresses: Iterable[str],
                   ports: Sequence[tuple[str, int, str]]) -> dict[str, Any]:
    """The EndpointSlice `<service>-bench` of `service`: one ready endpoint per
    address, `ports` as (name, target port, "tcp"/"udp")."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-bench", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "pcn-bench"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True, "serving": True,
                                                         "terminating": False}}
                      for ip in addresses],
        "ports": [{"name": n, "port": p, "protocol": proto.upper()} for n, p, proto in ports],
    }


# --- readiness: what kube-proxy wrote ---

_IPT_SERVICE = re.compile(r"^-A KUBE-SERVICES .*-d (\S+)/32 .*--dport (\d+) .*-j (KUBE-SVC-\w+)")
_IPT_SVC_TO_SEP = re.compile(r"^-A (KUBE-SVC-\w+) .*-j (KUBE-SEP-\w+)")
_IPT_SEP_DNAT = re.compile(r"^-A (KUBE-SEP-\w+) .*--to-destination (\S+):(\d+)")
_NFT_SERVICE = re.compile(r"(\d+\.\d+\.\d+\.\d+) \. (?:tcp|udp|sctp) \. (\d+) : goto "
                          r"(service-[^,\s}]+)")
# a service chain's body up to its first "}" (the end of a numgen map, if any)
_NFT_SERVICE_CHAIN = re.compile(r"chain (service-\S+) \{([^}]*)\}")
# one endpoint: the service chain DNATs itself; more: a numgen map of addresses (v1.37)
# or a numgen vmap to endpoint chains
_NFT_ENDPOINT = re.compile(r"(\d+\.\d+\.\d+\.\d+)(?::| \. )(\d+)\b"
                           r"|goto endpoint-\S+__(\d+\.\d+\.\d+\.\d+)/(\d+)")

Key = tuple[str, int]  # (ClusterIP, port)


def programmed(text: str, mode: str) -> tuple[set[Key], set[tuple[str, int, str, int]]]:
    """(ClusterIP, port) pairs with a service chain and (ClusterIP, port,
    endpoint IP, endpoint port) with that endpoint in it, from `text`
    (`iptables-save -t nat` in iptables mode, `nft list table ip kube-proxy`
    in nftables mode). Keyed by address, not by the rules' comments: above
    1000 endpoints kube-proxy's iptables mode leaves most comments out
    (largeClusterEndpointsThreshold, pkg/proxy/iptables/proxier.go)."""
    services: dict[str, Key] = {}  # service chain -> (ClusterIP, port)
    endpoints: set[tuple[str, int, str, int]] = set()
    if mode == "iptables":
        sep_owner: dict[str, str] = {}
        dnat: dict[str, tuple[str, int]] = {}
        for line in text.splitlines():
            if m := _IPT_SERVICE.match(line):
                services[m.group(3)] = (m.group(1), int(m.group(2)))
            elif m := _IPT_SVC_TO_SEP.match(line):
                sep_owner[m.group(2)] = m.group(1)
            elif m := _IPT_SEP_DNAT.match(line):
                dnat[m.group(1)] = (m.group(2), int(m.group(3)))
        for sep, (ip, port) in dnat.items():
            key = services.get(sep_owner.get(sep, ""))
            if key is not None:
                endpoints.add((*key, ip, port))
    elif mode == "nftables":
        services = {m.group(3): (m.group(1), int(m.group(2)))
                    for m in _NFT_SERVICE.finditer(text)}
        for chain in _NFT_SERVICE_CHAIN.finditer(text):
            key = services.get(chain.group(1))
            if key is None:
                continue
            for m in _NFT_ENDPOINT.finditer(chain.group(2)):
                ip, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
                endpoints.add((*key, ip, int(port)))
    else:
        raise ValueError(f"kube-proxy mode {mode!r}")
    return set(services.values()), endpoints


def missing(text: str, mode: str, ports: Sequence[ServicePort],
            with_endpoints: Sequence[ServicePort] = ()) -> list[str]:
    """What of `ports` (their ClusterIP:port) and of the endpoints of
    `with_endpoints` the rules in `text` lack, as readable strings ([]: all
    programmed). Only services with endpoints get a service chain."""
    services, endpoints = programmed(text, mode)
    out = [f"{sp.port_id} {sp.cluster_ip}:{sp.port}" for sp in ports
           if sp.endpoints and (sp.cluster_ip, sp.port) not in services]
    out += [f"{sp.port_id} -> {ip}:{port}" for sp in with_endpoints for ip, port in sp.endpoints
            if (sp.cluster_ip, sp.port, ip, port) not in endpoints]
    return out


def rules_text(netns: str, mode: str) -> str:
    """kube-proxy's rules in `netns` now ("" when it wrote none yet)."""
    argv = (["iptables-save", "-t", "nat"] if mode == "iptables"
            else ["nft", "list", "table", "ip", NFT_TABLE])
    return exec_in(netns, argv, check=False, timeout=120).stdout


def rule_count(netns: str, mode: str) -> int:
    """Rules kube-proxy wrote in `netns` (iptables: nat `-A` lines; nftables:
    rule lines and map/set elements of its table)."""
    text = rules_text(netns, mode)
    if mode == "iptables":
        return sum(1 for line in text.splitlines() if line.startswith("-A "))
    return sum(1 for line in text.splitlines()
               if line.strip() and not line.strip().startswith(("chain ", "table ", "}", "type ",
                                                                "map ", "set ", "flags ",
                                                                "comment ", "elements ")))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {series: value} (series with labels kept
    verbatim, comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


# --- processes ---


def bin_dir() -> Path:
    """`make k8s`'s binaries (etcd, kube-apiserver, kube-proxy)."""
    from pcn_lab.cluster import artifacts

    return Path(artifacts.bin_dir())


def binaries_missing(directory: Path | None = None) -> list[str]:
    d = directory or bin_dir()
    return [b for b in ("etcd", "kube-apiserver", "kube-proxy") if not (d / b).exists()]


def _wait_file(path: Path, proc: subprocess.Popen[Any], what: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode})")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: no {path} after {timeout:.0f} s")


def start_relay(api_netns: str, target_port: int, port_file: Path, log_file: Path,
                from_netns: str | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """A relay from 127.0.0.1:<port> of `from_netns` (None: this namespace) to
    127.0.0.1:`target_port` of `api_netns`; returns (process, port)."""
    argv = [sys.executable, "-m", "pcn_lab.cluster.relay", "--netns", api_netns,
            "--target", f"127.0.0.1:{target_port}", "--port-file", str(port_file)]
    if from_netns is not None:
        argv = ["ip", "netns", "exec", from_netns, *argv]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        return proc, int(_wait_file(port_file, proc, f"relay into {api_netns}"))
    except BaseException:
        stop(proc)
        raise



class CreateBudgetExceeded(RuntimeError):
    """ApiClient.create_all stopped: at its rate so far, creating every object
    would take `projected_s` s, past the budget it was given."""

    def __init__(self, created: int, total: int, elapsed_s: float, projected_s: float) -> None:
        super().__init__(f"{created} of {total} API objects created in {elapsed_s:.0f} s "
                         f"({created / max(elapsed_s, 1e-9):.0f}/s): all of them would take "
                         f"~{projected_s / 60:.0f} min")
        self.created, self.total = created, total
        self.elapsed_s, self.projected_s = elapsed_s, projected_s

class ApiClient:
    """JSON over HTTPS to the bench's API server with the bench token, one
    kept-alive connection per thread. Raises RuntimeError with the server's
    message for any status >= 300."""

    def __init__(self, port: int, token: str = TOKEN) -> None:
        self.port, self.token = port, token
        self._ctx = ssl.create_default_context()
        self._ctx.check_hostname = False
        self._ctx.verify_mode = ssl.CERT_NONE  # self-signed, loopback only
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ctx,
                                               timeout=60)
            self._local.conn = conn
        return conn

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                content_type: str = "application/json", decode: bool = True
                ) -> dict[str, Any]:
        """One request; the answer's JSON ({} for an empty answer or when not
        `decode`, as for /readyz's plain "ok")."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json",
                   "Content-Type": content_type}
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status} {raw[:400].decode(errors='replace')}")
        return json.loads(raw) if raw and decode else {}

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", collection_path(obj), obj)

    def create_all(self, objs: Sequence[dict[str, Any]], workers: int = 8,
                   progress: Callable[[int, int, float], None] | None = None,
                   budget_s: float | None = None, every_s: float = 10.0) -> float:
        """Create `objs` (namespaced objects of one kind after another, in
        order per kind) with `workers` threads; returns the seconds it took.

        Every `every_s` s, `progress(created, total, elapsed_s)`. With
        `budget_s`, raises CreateBudgetExceeded as soon as the rate so far
        projects the whole past `budget_s` (the creates in flight end, the
        queued ones are cancelled): an API server slows down as it fills
        (the bench's went from ~550 to ~13 objects/s between 10 000 and
        100 000 Services), so the rate of a smaller level does not predict a
        larger one's. A failed create raises what `create` raised."""
        t = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            pending = {pool.submit(self.create, o) for o in objs}
            while pending:
                done, pending = wait(pending, timeout=every_s, return_when=FIRST_EXCEPTION)
                for f in done:
                    f.result()  # a failed create: raised here
                created, elapsed = len(objs) - len(pending), time.perf_counter() - t
                if not pending:
                    break
                if progress is not None:
                    progress(created, len(objs), elapsed)
                projected = elapsed * len(objs) / max(created, 1)
                if budget_s is not None and projected > budget_s:
                    raise CreateBudgetExceeded(created, len(objs), elapsed, projected)
        except BaseException:
            # an interrupted run (or a failed create) must not wait for the
            # rest of a long queue: 200 000 creates take an hour on a busy machine
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return time.perf_counter() - t

    def ready(self) -> bool:
        try:
            self.request("GET", "/readyz", decode=False)
            return True
        except (OSError, RuntimeError, http.client.HTTPException):
            return False


def collection_path(obj: dict[str, Any]) -> str:
    """The REST collection an object is POSTed to (core v1 or a group)."""
    api, kind = obj["apiVersion"], obj["kind"]
    plural = {"Service": "services", "EndpointSlice": "endpointslices",
              "Namespace": "namespaces", "Node": "nodes"}[kind]
    base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    ns = obj["metadata"].get("namespace")
    return f"{base}/namespaces/{ns}/{plural}" if ns else f"{base}/{plural}"


@dataclass
class ControlPlane:
    """etcd and kube-apiserver in `netns` (their own namespace), the bench's
    client through a relay from the root namespace. `start()` returns when
    /readyz answers; `close()` stops everything it started (also after a
    failed start)."""

    netns: str
    workdir: Path
    binaries: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api_port: int = 0
    client: ApiClient | None = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 120) -> ApiClient:
        d = self.workdir
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out",
                        str(d / "sa.pub")], check=True, capture_output=True)
        (d / "tokens.csv").write_text(f"{TOKEN},bench-admin,1,system:masters\n")
        # Fixed ports are fine: the namespace is this run's own.
        etcd_client, etcd_peer, self.api_port = 2379, 2380, 6443
        b = self.binaries
        self._spawn("etcd", [
            str(b / "etcd"), "--data-dir", str(d / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync",  # a throwaway store: its fsyncs would only slow the installs
            # service-scale's 100 000 Services, EndpointSlices and ClusterIP
            # IPAddress objects, with their history until the API server
            # compacts it, pass etcd's default 2 GiB quota
            "--quota-backend-bytes=8589934592"])
        self._spawn("kube-apiserver", [
            str(b / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            f"--secure-port={self.api_port}", "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
            f"--cert-dir={d / 'certs'}", "--service-account-issuer=https://kubernetes",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--authorization-mode=AlwaysAllow", f"--token-auth-file={d / 'tokens.csv'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--max-requests-inflight=2000", "--max-mutating-requests-inflight=1000"])
        relay, port = start_relay(self.netns, self.api_port, d / "relay-root.port",
                                  d / "relay.log")
        self.procs.append(relay)
        client = ApiClient(port)
        deadline = time.monotonic() + timeout
        while not client.ready():
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"control plane process exited: {dead[0]}; logs in {d}: "
                                   f"{self.log_tail('kube-apiserver')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kube-apiserver not ready after {timeout:.0f} s: "
                                   f"{self.log_tail('kube-apiserver')}")
            time.sleep(0.5)
        self.client = client
        return client

    def relay_into(self, from_netns: str, tag: str) -> int:
        """A relay from 127.0.0.1 of `from_netns` to the API server: its port."""
        proc, port = start_relay(self.netns, self.api_port, self.workdir / f"relay-{tag}.port",
                                 self.workdir / "relay.log", from_netns=from_netns)
        self.procs.append(proc)
        return port

    def log_tail(self, name: str, chars: int = 1500) -> str:
        p = self.workdir / f"{name}.log"
        return p.read_text(errors="replace")[-chars:] if p.exists() else ""

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc, timeout=20)
        self.procs.clear()


@dataclass
class KubeProxy:
    """kube-proxy of `mode` in `netns` as node `hostname`, talking to the
    API server through a relay on that namespace's loopback (`api_port`)."""

    netns: str
    mode: str
    hostname: str
    cluster_cidr: str
    api_port: int
    workdir: Path
    binaries: Path
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 10249
    healthz_port: int = 10256
    started_at: float = 0.0  # time.time() of start()

    def write_files(self) -> Path:
        """The kubeconfig and the KubeProxyConfiguration; the config's path."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        kc = self.workdir / "kubeconfig"
        kc.write_text(json.dumps(kubeconfig(f"https://127.0.0.1:{self.api_port}")))
        cfg = self.workdir / "config.json"  # JSON is YAML: kube-proxy reads it as its config
        cfg.write_text(json.dumps(proxy_config(self.mode, self.hostname, self.cluster_cidr, kc,
                                               self.metrics_port, self.healthz_port)))
        return cfg

    def start(self) -> None:
        cfg = self.write_files()
        self.started_at = time.time()  # wall clock: kube-proxy's metrics are Unix times
        with open(self.workdir / "kube-proxy.log", "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, str(self.binaries / "kube-proxy"),
                 f"--config={cfg}", f"--hostname-override={self.hostname}", "--v=1"],
                stdout=out, stderr=subprocess.STDOUT)

    def log_tail(self, chars: int = 2000) -> str:
        p = self.workdir / "kube-proxy.log"
        return p.read_text(errors="replace")[-chars:] if p.exists() else ""

    def wait_programmed(self, ports: Sequence[ServicePort],
                        with_endpoints: Sequence[ServicePort] = (), timeout: float = 600,
                        interval: float = 0.2) -> float:
        """Wait until kube-proxy's rules hold every service of `ports` and
        every endpoint of `with_endpoints`; returns the seconds from start()
        to the end of the sync that wrote them (its
        kubeproxy_sync_proxy_rules_last_timestamp_seconds, so the polling's
        own delay is not counted). The rules are read only after each new
        sync (the metric changed): reading 65 000 rules with iptables-save
        takes a CPU of its own, which would slow the sync being timed.
        Raises RuntimeError (with what is missing) on timeout or if
        kube-proxy exits."""
        deadline = time.monotonic() + timeout
        seen = 0.0
        left: list[str] = ["no sync yet"]
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"kube-proxy ({self.mode}) in {self.netns} exited: "
                                   f"{self.log_tail()}")
            synced = self.metrics().get(SYNC_TIMESTAMP, 0.0)
            if synced > seen:
                seen = synced
                left = missing(rules_text(self.netns, self.mode), self.mode, ports,
                               with_endpoints)
                if not left:
                    last = self.metrics().get(SYNC_TIMESTAMP, seen)
                    return max(0.0, min(seen, last) - self.started_at)
            if time.monotonic() > deadline:
                raise RuntimeError(f"kube-proxy ({self.mode}) in {self.netns}: after "
                                   f"{timeout:.0f} s still missing {len(left)} "
                                   f"(e.g. {left[:3]}): {self.log_tail()}")
            time.sleep(interval)

    def metrics(self) -> dict[str, float]:
        """kube-proxy's /metrics, read from inside its namespace."""
        code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                f"'http://127.0.0.1:{self.metrics_port}/metrics', timeout=10).read().decode())")
        out = exec_in(self.netns, [sys.executable, "-c", code], check=False).stdout
        return parse_metrics(out)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=20)
            self.proc = None

    def cleanup(self) -> None:
        """Stop it and remove its rules (`kube-proxy --cleanup`, which removes
        both modes' rules), so that the next start installs from nothing."""
        self.stop()
        exec_in(self.netns, [str(self.binaries / "kube-proxy"), "--cleanup", "--v=0"],
                check=False, timeout=120)


def version(binaries: Path) -> str:
    out = subprocess.run([str(binaries / "kube-proxy"), "--version"], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip() or out.stderr.strip()
