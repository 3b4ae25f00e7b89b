"""The cluster's certificates and keys, made with Debian's `openssl` CLI.

One CA signs everything (as kubeadm's does, minus its separate etcd and
front-proxy CAs). Each certificate is a P-256 key, a CSR from a small
OpenSSL config (subject and extensions) and the CA's signature; the
ServiceAccount token keys are an RSA pair. Subjects follow Kubernetes'
conventions (https://kubernetes.io/docs/setup/best-practices/certificates/):
CN is the user name and O the groups the API server's x509 authenticator
gives the client, so the kubelets are `system:node:<name>` in
`system:nodes` (the Node authorizer and NodeRestriction need exactly that).

Pure parts (`cluster_certs`, `openssl_config`, `commands`) are unit-tested;
`generate` runs the commands (well under a second per certificate) and is
idempotent: a certificate whose .crt exists is kept.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pcn_lab.cluster.layout import CLUSTER_DOMAIN, KUBERNETES_SERVICE_IP, Layout

DAYS = 3650
CA = "ca"


@dataclass(frozen=True)
class CertSpec:
    """One certificate: files ``<name>.key`` / ``<name>.crt`` in the PKI folder."""

    name: str
    cn: str
    orgs: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    server: bool = False
    client: bool = False
    ca: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def cluster_certs(layout: Layout) -> list[CertSpec]:
    """Every certificate of a cluster, the CA first."""
    api_dns = ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
               f"kubernetes.default.svc.{CLUSTER_DOMAIN}", "localhost", layout.control_plane)
    specs = [
        CertSpec(CA, "pcn-lab-ca", ca=True),
        # kubectl reaches it on 127.0.0.1 of the root namespace through the relay
        CertSpec("apiserver", "kube-apiserver", dns=api_dns,
                 ips=("127.0.0.1", layout.api_ip, KUBERNETES_SERVICE_IP), server=True),
        CertSpec("apiserver-etcd-client", "kube-apiserver-etcd-client", client=True),
        CertSpec("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                 orgs=("system:masters",), client=True),
        CertSpec("etcd", "etcd", dns=("localhost",), ips=("127.0.0.1",), server=True,
                 client=True),
        CertSpec("admin", "pcn-lab-admin", orgs=("system:masters",), client=True),
        CertSpec("controller-manager", "system:kube-controller-manager", client=True),
        CertSpec("scheduler", "system:kube-scheduler", client=True),
    ]
    for node in layout.nodes:
        specs.append(CertSpec(f"kubelet-{node}", f"system:node:{node}", orgs=("system:nodes",),
                              client=True))
        specs.append(CertSpec(f"kubelet-serving-{node}", f"system:node:{node}",
                              orgs=("system:nodes",), dns=(node,),
                              ips=(layout.node_ip(node),), server=True))
    return specs


def openssl_config(spec: CertSpec) -> str:
    """The OpenSSL config of `spec`: its subject (section dn) and its v3
    extensions (section ext)."""
    lines = ["[req]", "prompt = no", "distinguished_name = dn", "", "[dn]"]
    lines += [f"{i}.O = {org}" for i, org in enumerate(spec.orgs)]
    lines += [f"CN = {spec.cn}", "", "[ext]"]
    if spec.ca:
        lines += ["basicConstraints = critical, CA:TRUE",
                  "keyUsage = critical, keyCertSign, cRLSign, digitalSignature",
                  "subjectKeyIdentifier = hash"]
    else:
        lines += ["basicConstraints = critical, CA:FALSE",
                  "keyUsage = critical, digitalSignature, keyEncipherment"]
        usages = [u for u, on in (("serverAuth", spec.server), ("clientAuth", spec.client)) if on]
        if usages:
            lines.append(f"extendedKeyUsage = {', '.join(usages)}")
        sans = [f"DNS:{d}" for d in spec.dns] + [f"IP:{ip}" for ip in spec.ips]
        if sans:
            lines.append(f"subjectAltName = {', '.join(sans)}")
        lines.append("authorityKeyIdentifier = keyid")
    lines += [f"{k} = {v}" for k, v in spec.extra.items()]
    return "\n".join(lines) + "\n"


def commands(spec: CertSpec, pki: Path) -> list[list[str]]:
    """The openssl invocations that make `spec`'s key and certificate in `pki`
    (its config must be written to ``<name>.cnf`` first)."""
    key, crt, cnf, csr = (pki / f"{spec.name}.{s}" for s in ("key", "crt", "cnf", "csr"))
    genkey = ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
              "-out", str(key)]
    if spec.ca:
        return [genkey, ["openssl", "req", "-x509", "-new", "-key", str(key), "-config", str(cnf),
                         "-extensions", "ext", "-days", str(DAYS), "-sha256", "-out", str(crt)]]
    return [genkey,
            ["openssl", "req", "-new", "-key", str(key), "-config", str(cnf), "-out", str(csr)],
            ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki / f"{CA}.crt"),
             "-CAkey", str(pki / f"{CA}.key"), "-set_serial", _serial(spec.name),
             "-days", str(DAYS), "-sha256", "-extfile", str(cnf), "-extensions", "ext",
             "-out", str(crt)]]


def service_account_commands(pki: Path) -> list[list[str]]:
    """The ServiceAccount token signing key (sa.key) and its public half (sa.pub)."""
    return [["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", str(pki / "sa.key")],
            ["openssl", "pkey", "-in", str(pki / "sa.key"), "-pubout", "-out",
             str(pki / "sa.pub")]]


def _serial(name: str) -> str:
    import hashlib

    return "0x" + hashlib.sha256(name.encode()).hexdigest()[:16]


def generate(layout: Layout) -> list[str]:
    """Make every missing key and certificate of `layout` in layout.pki;
    returns the names made. Raises RuntimeError with openssl's message."""
    pki = layout.pki
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    made = []
    for spec in cluster_certs(layout):
        if (pki / f"{spec.name}.crt").exists():
            continue
        (pki / f"{spec.name}.cnf").write_text(openssl_config(spec))
        for argv in commands(spec, pki):
            _run(argv)
        made.append(spec.name)
    if not (pki / "sa.pub").exists():
        for argv in service_account_commands(pki):
            _run(argv)
        made.append("sa")
    return made


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
