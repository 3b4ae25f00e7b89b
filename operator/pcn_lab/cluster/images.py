"""The container images of the real-cluster lab, built without Docker or a
registry, as OCI archives in ``artifacts.image_dir()`` (``python -m
pcn_lab.cluster.images``; ``make k8s`` calls ``build_images()``).

Names are the ones the nodes and the e2e framework ask for, so no registry
override is needed (k8s.io/kubernetes v1.37.2, test/utils/image/manifest.go):

* ``registry.k8s.io/pause:3.10.2``: the e2e Pause image, kubelet's and
  containerd v2.4.2's default sandbox image (internal/cri/config
  ``DefaultSandboxImage``); build/pause/linux/pause.c of the kubernetes
  module compiled with ``gcc -Os -static`` (its Makefile's flags), user
  65535, as build/pause/Dockerfile;
* ``registry.k8s.io/e2e-test-images/agnhost:2.66.1``: bin/agnhost on Debian
  with what test/images/agnhost/Dockerfile adds to Alpine (dig, curl, nc,
  ip, iperf, bash, socat; ps, ping, wget that Alpine's busybox gives), the
  /coredns the DNS tests run (bin/coredns), porter's localhost.crt/key, the
  /uploads folder, /agnhost-2, the user and group the tests look up;
  ``/bin/sh`` is bash (Alpine's is busybox ash, which takes ``[[``); also
  tagged ``agnhost:2.45``, the tag network-policy-api's conformance suite
  asks for;
* ``registry.k8s.io/e2e-test-images/busybox:1.37.0-2``: Debian's
  busybox-static with its applet links;
* ``registry.k8s.io/e2e-test-images/glibc-dns-testing:2.1.1`` (formerly
  jessie-dnsutils; network/dns.go's glibc prober): Debian slim + dig;
* ``registry.k8s.io/e2e-test-images/nginx:1.27.0-2`` and ``:1.28.0-2``
  (NginxNew): Debian's nginx on port 80, logs to stdout/stderr, ``nginx -g
  'daemon off;'`` as the official image runs it;
* ``registry.k8s.io/coredns/coredns:v1.14.7``: bin/coredns as CoreDNS's own
  Dockerfile lays it out (/coredns with cap_net_bind_service, user nonroot
  65532, CA certificates);
* ``docker.io/library/pcn-agent:0.1.0``: manifests/Dockerfile built by
  pcn_lab.cluster.dockerfile (the kubelet passes ``pcn-agent:0.1.0`` from
  manifests/kustomization.yaml to the CRI, and containerd normalises a bare
  name to ``docker.io/library/<name>``, reference.ParseDockerRef).

No httpd image: v1.37.2's manifest has none any more (agnhost serves HTTP).

Each image has a stamp ``stamps/image-<name>-<key>`` with ``key`` a digest of
its inputs (recipe, Debian sources and suite, binaries it copies; for
pcn-agent the build context after .dockerignore and the Dockerfile), so a
second run rebuilds nothing and only a change to pcn rebuilds pcn-agent.
``images.json`` lists ``{"ref", "file"}`` of every image.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pcn_lab.cluster import artifacts, dockerfile, oci, rootfs

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO_ROOT / "manifests" / "Dockerfile"
EPOCH = oci.DEFAULT_EPOCH
#: Part of every image's key: bump when the way layers are written changes.
LAYER_FORMAT = 2
PAUSE_VERSION = "3.10.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def kubernetes_module() -> Path:
    """The downloaded k8s.io/kubernetes module folder. Raises
    FileNotFoundError naming the fix."""
    version = artifacts.versions()["kubernetes"]["version"]
    path = artifacts.go_mod_cache() / f"k8s.io/kubernetes@{version}"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: run `go mod download k8s.io/kubernetes@{version}` "
                                f"(or `make k8s`)")
    return path


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


@dataclass
class Recipe:
    """One root filesystem, archived under each of ``refs``.

    ``packages``: Debian packages on the slim base (None: no Debian base);
    ``needs``: binaries of ``artifacts.bin_dir()`` it copies; ``fill(root)``
    completes the root filesystem and returns the image config;
    ``inputs()`` returns what else decides its content (hashed into the key).
    Bump ``revision`` when ``fill`` changes."""

    name: str
    refs: tuple[str, ...]
    fill: Callable[[Path], oci.ImageConfig]
    packages: tuple[str, ...] | None = None
    needs: tuple[str, ...] = ()
    inputs: Callable[[], dict[str, str]] = dict
    revision: int = 1

    def files(self) -> dict[str, str]:
        """``{reference: archive file name}``."""
        return {ref: _archive_name(ref) for ref in self.refs}


def _archive_name(ref: str) -> str:
    return ref.replace("/", "_").replace(":", "_") + ".tar"


# ------------------------------------------------------------------ recipes

def _base_dirs(root: Path) -> None:
    for name, mode in (("bin", 0o755), ("etc", 0o755), ("dev", 0o755), ("proc", 0o555), ("sys", 0o555),
                       ("tmp", 0o1777), ("root", 0o700), ("home", 0o755), ("var", 0o755)):
        (root / name).mkdir(exist_ok=True)
        os.chmod(root / name, mode)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def _install_binary(name: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifacts.binary(name), dest)
    os.chmod(dest, 0o755)


def _is_static(path: Path) -> bool:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    return out.returncode != 0 or "not a dynamic executable" in out.stdout + out.stderr


def _copy_shared_libraries(binary: Path, root: Path) -> None:
    """Copy the shared libraries ``binary`` loads (by ldd) into ``root``, at
    the same paths: for a Go binary built with cgo put on a scratch base."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0]
        if path.startswith("/"):
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dest)


def _pause_binary() -> Path:
    """Compile pause.c (static, the upstream Makefile's CFLAGS) into the work
    folder; also install it as bin/pause when that is missing."""
    source = kubernetes_module() / "build" / "pause" / "linux" / "pause.c"
    out = artifacts.work_dir() / "images" / "pause" / "pause"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{PAUSE_VERSION}-pcn",
                    "-o", str(out), str(source)], check=True)
    subprocess.run(["strip", str(out)], check=True)
    target = artifacts.bin_dir() / "pause"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, target.with_name(".pause.tmp"))
        os.chmod(target.with_name(".pause.tmp"), 0o755)
        os.replace(target.with_name(".pause.tmp"), target)
    return out


def _pause_inputs() -> dict[str, str]:
    source = kubernetes_module() / "build" / "pause" / "linux" / "pause.c"
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return {"pause.c": _sha256_file(source), "gcc": gcc}


def _fill_pause(root: Path) -> oci.ImageConfig:
    binary = _pause_binary()
    shutil.copyfile(binary, root / "pause")
    os.chmod(root / "pause", 0o755)
    return oci.ImageConfig(entrypoint=["/pause"], user="65535:65535", env=[f"PATH={DEFAULT_PATH}"])


def _deb_version(package: str) -> str:
    """The candidate version of ``package`` in the host's apt lists (runs
    ``apt-get update`` once when the lists do not know it)."""
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                             capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Version: "):
                return line.split(": ", 1)[1]
        if attempt == 0:
            log.info("apt-get update (the host's lists do not know %s)", package)
            subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
    raise RuntimeError(f"Debian package {package} is unknown to apt: check /etc/apt/sources.list*")


def _fill_busybox(root: Path) -> oci.ImageConfig:
    with tempfile.TemporaryDirectory(prefix="pcn-busybox-") as tmp:
        subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"busybox-static={_deb_version('busybox-static')}"],
                       cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (deb,) = Path(tmp).glob("busybox-static_*.deb")
        extracted = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(extracted)], check=True)
        found = [p for p in (extracted / "bin" / "busybox", extracted / "usr" / "bin" / "busybox") if p.exists()]
        if not found:
            raise RuntimeError(f"{deb.name} has no bin/busybox")
        _base_dirs(root)
        shutil.copy2(found[0], root / "bin" / "busybox")
    applets = subprocess.run([str(root / "bin" / "busybox"), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    _write(root / "etc" / "passwd", "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
           "nobody:x:65534:65534:nobody:/home:/bin/false\n")
    _write(root / "etc" / "group", "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n")
    return oci.ImageConfig(cmd=["sh"], env=[f"PATH={DEFAULT_PATH}"])


def _busybox_inputs() -> dict[str, str]:
    return {"busybox-static": _deb_version("busybox-static")}


def _fill_glibc_dns(root: Path) -> oci.ImageConfig:
    return oci.ImageConfig(cmd=["bash"], env=[f"PATH={DEFAULT_PATH}"])


def _append_line(path: Path, line: str) -> None:
    text = path.read_text()
    if line.split(":", 1)[0] + ":" not in [entry.split(":", 1)[0] + ":" for entry in text.splitlines()]:
        path.write_text(text + line + "\n")


def _fill_agnhost(root: Path) -> oci.ImageConfig:
    _install_binary("agnhost", root / "agnhost")
    (root / "agnhost-2").symlink_to("agnhost")
    _install_binary("coredns", root / "coredns")
    porter = kubernetes_module() / "test" / "images" / "agnhost" / "porter"
    for name in ("localhost.crt", "localhost.key"):
        shutil.copyfile(porter / name, root / name)
        os.chmod(root / name, 0o644)
    (root / "uploads").mkdir(exist_ok=True)
    iperf = root / "usr" / "local" / "bin" / "iperf"  # where the upstream Dockerfile links it
    iperf.parent.mkdir(parents=True, exist_ok=True)
    iperf.symlink_to("/usr/bin/iperf")
    # bash as /bin/sh, as Alpine's ash (busybox) the tests were written for takes [[ too.
    sh = root / "usr" / "bin" / "sh" if (root / "usr" / "bin" / "sh").is_symlink() else root / "bin" / "sh"
    sh.unlink()
    sh.symlink_to("bash")
    # adduser -u 1000 -D user-defined-in-image; addgroup -g 50000 group-defined-in-image; addgroup user group
    _append_line(root / "etc" / "passwd",
                 "user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh")
    _append_line(root / "etc" / "shadow", "user-defined-in-image:!:20000::::::")
    _append_line(root / "etc" / "group", "user-defined-in-image:x:1000:")
    _append_line(root / "etc" / "group", "group-defined-in-image:x:50000:user-defined-in-image")
    home = root / "home" / "user-defined-in-image"
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, 1000, 1000)
    return oci.ImageConfig(entrypoint=["/agnhost"], cmd=["pause"], env=[f"PATH={DEFAULT_PATH}"],
                           exposed_ports=["80/tcp", "8080/tcp", "8081/tcp", "9376/tcp", "5000/tcp"])


def _agnhost_inputs() -> dict[str, str]:
    porter = kubernetes_module() / "test" / "images" / "agnhost" / "porter"
    return {name: _sha256_file(porter / name) for name in ("localhost.crt", "localhost.key")}


NGINX_SITE = """\
# The e2e nginx image: port 80, the default page, logs to the container's output.
server {
    listen 80 default_server;
    listen [::]:80 default_server;
    root /usr/share/nginx/html;
    index index.html;
    server_name _;
    location / {
        try_files $uri $uri/ =404;
    }
}
"""


def _fill_nginx(root: Path) -> oci.ImageConfig:
    _write(root / "etc" / "nginx" / "sites-available" / "default", NGINX_SITE)
    for name, target in (("access.log", "/dev/stdout"), ("error.log", "/dev/stderr")):
        log_file = root / "var" / "log" / "nginx" / name
        log_file.unlink(missing_ok=True)
        log_file.symlink_to(target)
    if not (root / "usr" / "share" / "nginx" / "html" / "index.html").exists():
        raise RuntimeError("Debian's nginx no longer ships /usr/share/nginx/html/index.html")
    return oci.ImageConfig(cmd=["nginx", "-g", "daemon off;"], env=[f"PATH={DEFAULT_PATH}"],
                           exposed_ports=["80/tcp"])


def _fill_coredns(root: Path) -> oci.ImageConfig:
    _base_dirs(root)
    binary = root / "coredns"
    _install_binary("coredns", binary)
    if not _is_static(binary):
        _copy_shared_libraries(binary, root)
    subprocess.run(["setcap", "cap_net_bind_service=+ep", str(binary)], check=True)
    certs = Path("/usr/share/ca-certificates")
    bundle = root / "etc" / "ssl" / "certs" / "ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    # Debian's public roots only (not the host's local additions).
    bundle.write_bytes(b"".join(p.read_bytes() for p in sorted(certs.rglob("*.crt"))))
    _write(root / "etc" / "passwd", "root:x:0:0:root:/root:/sbin/nologin\n"
           "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
           "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
    _write(root / "etc" / "group", "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n")
    (root / "home" / "nonroot").mkdir(parents=True, exist_ok=True)
    os.chown(root / "home" / "nonroot", 65532, 65532)
    return oci.ImageConfig(entrypoint=["/coredns"], user="65532:65532", env=[f"PATH={DEFAULT_PATH}"],
                           exposed_ports=["53/tcp", "53/udp"])


def _fill_regression_74839(root: Path) -> oci.ImageConfig:
    """test/images/regression-issue-74839/Dockerfile: the binary at / on a
    Debian base, as its entrypoint."""
    binary = root / "regression-issue-74839"
    _install_binary("regression-issue-74839", binary)
    return oci.ImageConfig(entrypoint=["/regression-issue-74839"], env=[f"PATH={DEFAULT_PATH}"])


#: The agnhost tag sigs.k8s.io/network-policy-api v0.3.0's conformance base
#: manifests pin (conformance/base/manifests.yaml): served by the same image
#: (the agnhost of the pinned Kubernetes); the suite runs only subcommands
#: agnhost has kept since (serve-hostname, netexec, porter, connect).
AGNHOST_NETPOL_API_TAG = "2.45"


def _e2e(name: str, tag: str) -> str:
    return f"registry.k8s.io/e2e-test-images/{name}:{tag}"


def recipes() -> list[Recipe]:
    """Every image but pcn-agent, those without Go binaries first."""
    coredns_version = artifacts.versions()["coredns"]["version"]
    return [
        Recipe("pause", (f"registry.k8s.io/pause:{PAUSE_VERSION}",), _fill_pause, inputs=_pause_inputs),
        Recipe("busybox", (_e2e("busybox", "1.37.0-2"),), _fill_busybox, inputs=_busybox_inputs),
        Recipe("glibc-dns-testing", (_e2e("glibc-dns-testing", "2.1.1"),), _fill_glibc_dns,
               packages=("bind9-dnsutils",)),
        Recipe("nginx", (_e2e("nginx", "1.27.0-2"), _e2e("nginx", "1.28.0-2")), _fill_nginx,
               packages=("nginx",)),
        Recipe("coredns", (f"registry.k8s.io/coredns/coredns:{coredns_version}",), _fill_coredns,
               needs=("coredns",)),
        Recipe("agnhost", (_e2e("agnhost", "2.66.1"), _e2e("agnhost", AGNHOST_NETPOL_API_TAG)),
               _fill_agnhost, needs=("agnhost", "coredns"),
               packages=("bind9-dnsutils", "curl", "netcat-openbsd", "iproute2", "iperf", "socat",
                         "procps", "iputils-ping", "wget", "ca-certificates"),
               inputs=_agnhost_inputs),
        Recipe("regression-issue-74839", (_e2e("regression-issue-74839", "1.5"),),
               _fill_regression_74839, packages=(), needs=("regression-issue-74839",)),
    ]


# ------------------------------------------------------------------ building

def _key(document: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(name: str, key: str) -> Path:
    return artifacts.stamp_dir() / f"image-{name}-{key}"


def _done(name: str, key: str, files: list[str]) -> bool:
    return _stamp(name, key).exists() and all((artifacts.image_dir() / f).is_file() for f in files)


def _mark_done(name: str, key: str) -> None:
    artifacts.stamp_dir().mkdir(parents=True, exist_ok=True)
    for old in artifacts.stamp_dir().glob(f"image-{name}-*"):
        if len(old.name) == len(f"image-{name}-") + len(key):
            old.unlink()
    _stamp(name, key).touch()


def _debian_inputs() -> dict[str, object]:
    return {"suite": rootfs.suite(), "sources": rootfs.apt_sources(), "slim": list(rootfs.SLIM_DPKG_OPTIONS),
            "docker_files": rootfs.DOCKER_IMAGE_FILES}


def _archive(root: Path, refs: tuple[str, ...], config: oci.ImageConfig, created_from: float) -> list[str]:
    """Write ``root`` as one archive per reference (blobs in a scratch folder
    next to it, removed afterwards: the archives carry them). Files changed
    from ``created_from`` (Unix time: when making ``root`` began) on get the
    fixed EPOCH as their time, older ones (as packages ship them) keep theirs."""
    started = time.monotonic()
    blobs = root.parent / "blobs"
    shutil.rmtree(blobs, ignore_errors=True)
    layer = oci.write_layer(root, blobs, epoch=EPOCH, clamp_from=created_from)
    manifest = oci.write_image(blobs, [layer], config, created=EPOCH)
    files = []
    for ref in refs:
        out = artifacts.image_dir() / _archive_name(ref)
        out.parent.mkdir(parents=True, exist_ok=True)
        oci.write_archive(out, blobs, {ref: manifest})
        files.append(out.name)
        log.info("%s: %s (%.1f MB, layer %s) in %.0f s", ref, out.name, out.stat().st_size / 1e6,
                 layer.blob.digest[7:19], time.monotonic() - started)
    shutil.rmtree(blobs)
    return files


def build_recipe(recipe: Recipe) -> bool:
    """Build one recipe unless its stamp is current. Returns True when it
    built. Raises FileNotFoundError naming `make k8s` for a missing binary."""
    binaries = {name: _sha256_file(artifacts.binary(name)) for name in recipe.needs}
    key = _key({"recipe": recipe.name, "revision": recipe.revision, "refs": list(recipe.refs),
                "packages": list(recipe.packages) if recipe.packages is not None else None,
                "debian": _debian_inputs() if recipe.packages is not None else None,
                "binaries": binaries, "inputs": recipe.inputs(), "epoch": EPOCH,
                "format": LAYER_FORMAT})
    files = list(recipe.files().values())
    if _done(recipe.name, key, files):
        log.info("%s: up to date (%s)", recipe.name, ", ".join(recipe.refs))
        return False
    started, created_from = time.monotonic(), time.time()
    log.info("%s: building %s", recipe.name, ", ".join(recipe.refs))
    root = artifacts.work_dir() / "images" / recipe.name / "rootfs"
    if root.exists():
        shutil.rmtree(root)
    if recipe.packages is not None:
        rootfs.debian_rootfs(root, recipe.packages, epoch=EPOCH)
    else:
        root.mkdir(parents=True)
    config = recipe.fill(root)
    _archive(root, recipe.refs, config, created_from)
    shutil.rmtree(root)
    _mark_done(recipe.name, key)
    log.info("%s: built in %.0f s", recipe.name, time.monotonic() - started)
    return True


# --------------------------------------------------------------- pcn-agent

AGENT_REF = "docker.io/library/pcn-agent:0.1.0"
#: The external bases manifests/Dockerfile may start from.
DEBIAN_SLIM_BASES = ("debian:12-slim", "debian:bookworm-slim", "docker.io/library/debian:12-slim",
                     "docker.io/library/debian:bookworm-slim")


def _base_started() -> Path:
    """When the cached slim base began to be made (Unix time, one line)."""
    return artifacts.work_dir() / "images" / "bases" / "debian-slim.started"


def _debian_slim_base(reference: str, dest: Path) -> oci.ImageConfig:
    """A ``debian:12-slim`` stage base: a cached mmdebstrap minbase, copied."""
    if reference not in DEBIAN_SLIM_BASES:
        raise dockerfile.DockerfileError(
            f"FROM {reference}: only {', '.join(DEBIAN_SLIM_BASES[:2])} can be built here "
            f"(from Debian's packages); change the Dockerfile's base")
    key = _key({"base": "debian-slim", "debian": _debian_inputs(), "epoch": EPOCH})
    cached = artifacts.work_dir() / "images" / "bases" / "debian-slim"
    if not _stamp("base-debian-slim", key).exists() or not cached.is_dir() or not _base_started().is_file():
        started = time.time()
        rootfs.debian_rootfs(cached, (), epoch=EPOCH)
        _base_started().write_text(f"{started}\n")
        _mark_done("base-debian-slim", key)
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached), str(dest)], check=True)
    return oci.ImageConfig(cmd=["bash"], env=[f"PATH={DEFAULT_PATH}"])


def _build_environment(tmp: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(environment, binds) every RUN gets: the host's resolver, its CA
    bundle for pip (TLS-inspecting proxies), apt options the host's mirror
    needs, proxies from our environment, SOURCE_DATE_EPOCH (pip then writes
    hash-based .pyc files: reproducible)."""
    apt_conf = tmp / "apt.conf"
    apt_conf.write_text(rootfs.build_apt_conf())
    binds = {"/etc/resolv.conf": "/etc/resolv.conf", str(apt_conf): "/run/pcn-build/apt.conf"}
    env = {"APT_CONFIG": "/run/pcn-build/apt.conf", "SOURCE_DATE_EPOCH": str(EPOCH)}
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        binds[str(bundle)] = "/run/pcn-build/ca-certificates.crt"
        for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            env[var] = "/run/pcn-build/ca-certificates.crt"
    for var in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                "PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env, binds


def build_agent(dockerfile_path: Path = DOCKERFILE, context: Path = REPO_ROOT) -> bool:
    """Build pcn-agent from ``dockerfile_path`` unless its stamp (the context
    after .dockerignore, the Dockerfile, the Debian base) is current. Returns
    True when it built; raises DockerfileError when a step fails."""
    ignore = dockerfile_path.with_name(dockerfile_path.name + ".dockerignore")
    if not ignore.is_file():
        ignore = context / ".dockerignore"
    patterns = dockerfile.read_dockerignore(ignore)
    files = dockerfile.context_files(context, patterns)
    extra = [dockerfile_path] + ([ignore] if ignore.is_file() else [])
    key = _key({"context": dockerfile.context_digest(context, files, *extra), "debian": _debian_inputs(),
                "epoch": EPOCH, "ref": AGENT_REF, "format": LAYER_FORMAT})
    if _done("pcn-agent", key, [_archive_name(AGENT_REF)]):
        log.info("pcn-agent: up to date (%s)", AGENT_REF)
        return False
    started = time.monotonic()
    log.info("pcn-agent: building %s from %s (%d context files)", AGENT_REF, dockerfile_path, len(files))
    parsed = dockerfile.parse(dockerfile_path)
    work = artifacts.work_dir() / "images" / "pcn-agent"
    with tempfile.TemporaryDirectory(prefix="pcn-agent-build-") as tmp:
        env, binds = _build_environment(Path(tmp))
        build_log = artifacts.work_dir() / "images" / "pcn-agent.log"
        build_log.unlink(missing_ok=True)
        log.info("pcn-agent: RUN output in %s", build_log)
        builder = dockerfile.Builder(parsed=parsed, context=context, context_list=files, work=work,
                                     resolve_base=_debian_slim_base, run_env=env, run_binds=binds,
                                     log_path=build_log)
        final = builder.build()
        _archive(final.root, (AGENT_REF,), final.config, float(_base_started().read_text()))
    shutil.rmtree(work)
    _mark_done("pcn-agent", key)
    log.info("pcn-agent: built in %.0f s", time.monotonic() - started)
    return True


# ------------------------------------------------------------------ entry

def _wait_for(names: tuple[str, ...], timeout: float) -> None:
    """Return once the binaries are in ``artifacts.bin_dir()``; with a
    ``timeout`` (seconds), wait for them and for their size to stop changing
    (the other half of `make k8s` may still be writing them). Raises
    FileNotFoundError naming `make k8s` when they are not there in time."""
    deadline = time.monotonic() + timeout
    last: dict[str, int] = {}
    next_note = 0.0
    while True:
        sizes = {n: (artifacts.bin_dir() / n).stat().st_size if (artifacts.bin_dir() / n).is_file() else -1
                 for n in names}
        missing = [n for n, size in sizes.items() if size <= 0]
        if not missing and (timeout <= 0 or sizes == last):
            return
        if time.monotonic() >= deadline:
            raise FileNotFoundError(f"{', '.join(missing)} missing in {artifacts.bin_dir()}: "
                                    f"run `make k8s` first")
        last = sizes
        if time.monotonic() >= next_note:
            log.info("waiting for %s in %s", ", ".join(missing) or "their size to settle", artifacts.bin_dir())
            next_note = time.monotonic() + 60
        time.sleep(10 if missing else 5)


def write_index() -> Path:
    """Write images.json (``[{"ref", "file"}]`` of every image) and return it."""
    entries = [{"ref": ref, "file": name} for recipe in recipes() for ref, name in recipe.files().items()]
    entries.append({"ref": AGENT_REF, "file": _archive_name(AGENT_REF)})
    entries.sort(key=lambda e: e["ref"])
    out = artifacts.image_dir() / "images.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".images.json.tmp")
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def build_images(wait: float = 0.0, only: list[str] | None = None) -> None:
    """Build every image that is not up to date into ``artifacts.image_dir()``
    and write images.json. Images without Go binaries come first; for the
    others the binaries are waited for up to ``wait`` seconds. ``only``
    limits the build to the named recipes (``pcn-agent`` included). One
    build at a time (a lock in the work folder; a second waits).
    Raises FileNotFoundError naming `make k8s` when a binary is missing."""
    started = time.monotonic()
    wanted = set(only) if only else None
    chosen = [r for r in recipes() if wanted is None or r.name in wanted]
    lock_path = artifacts.work_dir() / "images" / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another image build holds %s: waiting for it", lock_path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        for recipe in [r for r in chosen if not r.needs]:
            build_recipe(recipe)
        if wanted is None or "pcn-agent" in wanted:
            build_agent()
        for recipe in [r for r in chosen if r.needs]:
            _wait_for(recipe.needs, wait)
            build_recipe(recipe)
        if wanted is None:
            index = write_index()
            log.info("images ready in %.0f s: %s", time.monotonic() - started, index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcn_lab.cluster.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for bin/agnhost and bin/coredns (default: fail at once)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="build only this image (pause, busybox, glibc-dns-testing, nginx, coredns, "
                             "agnhost, pcn-agent); repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if os.geteuid() != 0:
        print("building images needs root (mmdebstrap, chroot, mount namespaces): run it with sudo",
              file=sys.stderr)
        return 2
    try:
        build_images(wait=args.wait, only=args.only)
    except (FileNotFoundError, dockerfile.DockerfileError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
