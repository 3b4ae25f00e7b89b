"""`make k8s`: build the pinned upstream components of the real-cluster lab.

Every binary is built from source served by the Go module proxy, at the
versions of versions.toml only, into ``artifacts.bin_dir()`` (layout in
pcn_lab.cluster.artifacts). The steps run in this order, because the cluster
helper waits for the early ones and e2e.test is the biggest:

====================  =======================================================
step                  outputs (in ``bin/``)
====================  =======================================================
etcd                  etcd, etcdctl
kube-apiserver        kube-apiserver
kube-controller-...   kube-controller-manager
kube-scheduler        kube-scheduler
kubectl               kubectl
kubelet               kubelet
containerd            containerd, containerd-shim-runc-v2, ctr
runc                  runc (cgo + libseccomp; Debian's runc if that fails)
crictl                crictl
coredns               coredns
agnhost               agnhost
regression-74839      regression-issue-74839 (the Conntrack test's server)
cni-plugins           host-local, loopback
kube-proxy            kube-proxy
ginkgo                ginkgo
e2e.test              e2e.test
network-policy-api    network-policy-api-conformance.test,
                      network-policy-api-conformance-nosctp.test, test2json
====================  =======================================================

Each step is skipped when its stamp (``stamps/<step>``) exists and its
outputs are in ``bin/``; otherwise it builds into ``work/tmp/<step>/``, moves
each output into ``bin/`` with a rename (atomic: ``bin/`` never holds half a
binary) and writes the stamp. The full output of every ``go`` command goes to
``work/logs/<step>.log``; a failure prints its tail and the log's path. One
build runs at a time (a lock file in the cache folder), each with ``-p 2``.

How the components are built (the upstream build each follows is named):

* Kubernetes (``k8s.io/kubernetes``, hack/lib/golang.sh): as a dependency of a
  generated wrapper module in ``work/kubernetes`` whose go.mod requires it and
  replaces every staging module it pins at v0.0.0 (``k8s.io/X =>
  ./staging/src/k8s.io/X`` in its own go.mod) with the published
  ``staging`` version, and copies its ``go`` and ``godebug`` lines. The
  version ldflags of hack/lib/version.sh are set (else ``--version`` says
  v0.0.0). e2e.test is ``go test -c k8s.io/kubernetes/test/e2e``; ginkgo is
  built from the same module graph, so it is the version Kubernetes requires.
* etcd: the root package of ``go.etcd.io/etcd/server/v3`` (etcd's main, as
  upstream's build.sh builds it) and ``go.etcd.io/etcd/etcdctl/v3``, at the
  same version, as dependencies of a generated wrapper module in
  ``work/etcd`` (their own go.mod files replace etcd's other modules with
  sibling directories).
* containerd, runc, cri-tools, CoreDNS, CNI plugins: the module directory is
  copied from the (read-only) module cache into ``work/src/`` and built there
  with its own go.mod and go.sum, with the ldflags of its Makefile.

* network-policy-api (``sigs.k8s.io/network-policy-api``, its Makefile's
  ``conformance`` target): ``go test -c ./conformance`` in a copy of the
  module, at the version of netpol.toml (see pcn_lab.cluster.policyapi),
  once as published and once with the base manifests' SCTP servers removed
  (for kernels without SCTP); plus Go's own ``cmd/test2json``, which turns
  the test binary's output into JSON events.

Everything uses ``GOTOOLCHAIN=local``, ``-trimpath`` and ``-ldflags -s -w``;
cgo is off except for runc (libseccomp).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pcn_lab.cluster import artifacts, policyapi

#: Seconds between "still building" lines while one go command runs.
HEARTBEAT_S = 60.0
#: Lines of a failed command's log printed on failure.
LOG_TAIL_LINES = 40
#: Module path of the generated wrapper modules (never published).
WRAPPER_MODULE = "pcn.dev/k8s-build"
#: Build tags of the Kubernetes binaries (hack/lib/golang.sh's gotags).
KUBE_TAGS = ("selinux", "notest", "grpcnotrace")
#: Build tags of runc: its Makefile's BUILDTAGS without libpathrs (a Rust
#: library Debian does not package); runc then uses its Go path resolver.
RUNC_TAGS = ("seccomp", "urfave_cli_no_docs")
#: etcdctl's module, built at the version of etcd's server module.
ETCDCTL_MODULE = "go.etcd.io/etcd/etcdctl/v3"
#: containerd's snapshotters that need C libraries are left out (cgo is off).
CONTAINERD_TAGS = ("no_btrfs", "no_devmapper", "no_zfs")


class BuildError(RuntimeError):
    """A build step failed; the message names the step, the log and the fix."""


def say(message: str, out: TextIO | None = None) -> None:
    """One progress line, flushed at once (make shows it live)."""
    print(f"[k8s] {message}", file=out or sys.stdout, flush=True)


# --------------------------------------------------------------------------
# Pure parts: go.mod parsing, wrapper generation, ldflags.


@dataclass(frozen=True)
class GoMod:
    """The directives of a go.mod this build needs.

    ``replaces`` maps an old module path (without version) to the replacement
    text as written (``./staging/src/k8s.io/api`` or ``example.com/x v1.2.3``).
    """

    module: str
    go: str
    godebug: tuple[str, ...] = ()
    requires: Mapping[str, str] = field(default_factory=dict)
    replaces: Mapping[str, str] = field(default_factory=dict)


_COMMENT = re.compile(r"//.*$")


def _directive_lines(text: str) -> Iterator[tuple[str, str]]:
    """(verb, argument) for each directive line, blocks ``verb ( ... )`` unfolded."""
    block: str | None = None
    for raw in text.splitlines():
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        if block is not None:
            if line == ")":
                block = None
            else:
                yield block, line
            continue
        verb, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest == "(":
            block = verb
        else:
            yield verb, rest


def parse_gomod(text: str) -> GoMod:
    """Parse the module, go, godebug, require and replace directives of a go.mod.

    Follows the syntax of https://go.dev/ref/mod#go-mod-file (line comments,
    single-line and block forms); other directives are ignored. Raises
    ValueError when there is no module directive.
    """
    module = go = ""
    godebug: list[str] = []
    requires: dict[str, str] = {}
    replaces: dict[str, str] = {}
    for verb, arg in _directive_lines(text):
        if verb == "module":
            module = arg.strip('"')
        elif verb == "go":
            go = arg
        elif verb == "godebug":
            godebug.append(arg)
        elif verb == "require":
            parts = arg.split()
            if len(parts) >= 2:
                requires[parts[0]] = parts[1]
        elif verb == "replace":
            old, sep, new = arg.partition("=>")
            if sep:
                replaces[old.split()[0]] = new.strip()
    if not module:
        raise ValueError("not a go.mod: no module directive")
    return GoMod(module=module, go=go, godebug=tuple(godebug), requires=requires,
                 replaces=replaces)


def staging_modules(upstream: GoMod) -> list[str]:
    """The modules ``upstream`` replaces with a local directory (its staging
    modules, for k8s.io/kubernetes), sorted."""
    return sorted(old for old, new in upstream.replaces.items()
                  if new.startswith("./") or new.startswith("../"))


def wrapper_gomod(upstream: GoMod, version: str, staging_version: str) -> str:
    """go.mod text of a module that builds ``upstream`` at ``version`` as a dependency.

    Every module ``upstream`` replaces with a directory of its own is replaced
    with its published ``staging_version`` instead; the ``go`` and
    ``godebug`` lines are copied so the binaries keep upstream's defaults.
    """
    lines = [
        "// Generated by pcn_lab.cluster.build (`make k8s`): do not edit.",
        f"module {WRAPPER_MODULE}",
        "",
        f"go {upstream.go}" if upstream.go else "",
    ]
    lines += [f"godebug {line}" for line in upstream.godebug]
    lines += ["", f"require {upstream.module} {version}", ""]
    staged = staging_modules(upstream)
    if staged:
        lines.append("replace (")
        lines += [f"\t{mod} => {mod} {staging_version}" for mod in staged]
        lines.append(")")
    return "\n".join(lines) + "\n"


def kube_version_ldflags(version: str, commit: str = "", build_date: str = "") -> list[str]:
    """``-X`` flags stamping a Kubernetes version into a binary.

    The variables are those hack/lib/version.sh sets, in both
    k8s.io/component-base/version and k8s.io/client-go/pkg/version.
    ``version`` is ``vMAJOR.MINOR.PATCH`` (ValueError otherwise); ``build_date``
    is RFC 3339 (``2026-10-27T12:01:04Z``).
    """
    match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)(?:[-+].*)?", version)
    if not match:
        raise ValueError(f"not a Kubernetes version: {version!r} (want vMAJOR.MINOR.PATCH)")
    values = {
        "gitVersion": version,
        "gitMajor": match.group(1),
        "gitMinor": match.group(2),
        "gitTreeState": "clean",
        "gitCommit": commit,
        "buildDate": build_date,
    }
    flags: list[str] = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{name}={value}" for name, value in values.items() if value]
    return flags


def ldflags(*xflags: str) -> str:
    """The ``-ldflags`` value: stripped (``-s -w``) plus the given ``-X`` flags."""
    return " ".join(("-s", "-w", *xflags))


def etcd_wrapper_gomod(server_module: str, version: str, go: str) -> str:
    """go.mod of the etcd wrapper module: etcd's server and etcdctl at ``version``."""
    return (
        "// Generated by pcn_lab.cluster.build (`make k8s`): do not edit.\n"
        f"module {WRAPPER_MODULE}/etcd\n\ngo {go}\n\n"
        "require (\n"
        f"\t{server_module} {version}\n"
        f"\t{ETCDCTL_MODULE} {version}\n"
        ")\n"
    )


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless it already holds it; True when written.

    The write is atomic (a temporary file renamed over ``path``).
    """
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def write_gomod(module_dir: Path, text: str) -> bool:
    """Write a generated go.mod into ``module_dir`` unless it was generated
    from the same text before; True when written.

    ``go build -mod=mod`` adds the requirements it resolves to go.mod, so the
    generated text is compared with a copy kept in ``go.mod.generated``, not
    with go.mod itself (which would otherwise be reset on every run).
    """
    base = module_dir / "go.mod.generated"
    if (module_dir / "go.mod").is_file() and base.is_file() and base.read_text() == text:
        return False
    write_if_changed(module_dir / "go.mod", text)
    write_if_changed(base, text)
    return True


# --------------------------------------------------------------------------
# Running go.


@dataclass
class StepContext:
    """What a step's build function gets: where to put outputs, how to run go."""

    name: str
    out_dir: Path          # work/tmp/<step>: the outputs go here, final names
    log_path: Path         # work/logs/<step>.log
    work: Path             # artifacts.work_dir()

    def run(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> None:
        """Run one command, its output appended to the step's log, with a
        "still building" line every HEARTBEAT_S seconds. Raises BuildError
        with the log's tail when it exits non-zero."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        start = time.monotonic()
        with self.log_path.open("a") as log:
            log.write(f"$ (cd {cwd} && {' '.join(argv)})\n")
            log.flush()
            proc = subprocess.Popen(list(argv), cwd=cwd, env=full_env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            while True:
                try:
                    code = proc.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    say(f"  {self.name}: still building ({time.monotonic() - start:.0f} s)")
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
            log.write(f"# exit {code} after {time.monotonic() - start:.1f} s\n")
        if code != 0:
            raise BuildError(self._failure(argv, code))

    def _failure(self, argv: Sequence[str], code: int) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return (f"{self.name}: `{' '.join(argv[:3])} ...` exited {code}; last lines of "
                f"{self.log_path}:\n{tail}\n(full log: {self.log_path})")

    def go(self, subcommand: str, *args: str, cwd: Path, cgo: bool = False,
           extra_env: Mapping[str, str] | None = None) -> None:
        """``go <subcommand> <args>`` with the build's environment."""
        self.run(["go", subcommand, *args], cwd=cwd, env=go_env(cgo=cgo, extra=extra_env))

    def go_build(self, packages: Sequence[str], *, cwd: Path, ldflags_value: str,
                 tags: Sequence[str] = (), cgo: bool = False, output: str | None = None,
                 test: bool = False) -> None:
        """``go build`` (``go test -c`` when ``test``) of ``packages`` into
        out_dir (as ``output`` when one package is built)."""
        target = str(self.out_dir / output) if output else f"{self.out_dir}/"
        args = ["-c"] if test else []
        args += ["-p", "2", "-trimpath", "-mod=mod", "-ldflags", ldflags_value]
        if tags:
            args += ["-tags", ",".join(tags)]
        args += ["-o", target, *packages]
        self.go("test" if test else "build", *args, cwd=cwd, cgo=cgo)


def go_env(*, cgo: bool = False, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of every go command: the installed toolchain only, cgo off
    unless asked, no VCS stamping (module copies have no .git)."""
    flags = os.environ.get("GOFLAGS", "").split()
    if not any(flag.startswith("-buildvcs") for flag in flags):
        flags.append("-buildvcs=false")
    env = {"GOTOOLCHAIN": "local", "CGO_ENABLED": "1" if cgo else "0", "GOFLAGS": " ".join(flags)}
    env.update(extra or {})
    return env


def go_mod_download(module: str, version: str, *, cwd: Path) -> dict[str, Any]:
    """``go mod download -json module@version``: the module's Dir, GoMod, Info, ...

    Raises BuildError naming the module when the proxy does not serve it.
    """
    argv = ["go", "mod", "download", "-json", f"{module}@{version}"]
    env = dict(os.environ)
    env.update(go_env())
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    try:
        info: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        info = {}
    if proc.returncode != 0 or "Error" in info or "Dir" not in info:
        detail = info.get("Error") or proc.stderr.strip()
        raise BuildError(f"cannot download {module}@{version} from the Go module proxy "
                         f"({env.get('GOPROXY') or 'GOPROXY default'}): {detail}")
    return info


def module_time(info: Mapping[str, Any]) -> str:
    """The version's commit time (RFC 3339) from ``go mod download -json``'s
    Info file, or "" when absent."""
    try:
        data = json.loads(Path(info["Info"]).read_text())
    except (KeyError, OSError, json.JSONDecodeError):
        return ""
    stamp = data.get("Time", "")
    return stamp if isinstance(stamp, str) else ""


def copy_module(info: Mapping[str, Any], dest_root: Path) -> Path:
    """A writable copy of a downloaded module's directory under ``dest_root``
    (``<name>@<version>``), made once (copied under a temporary name, then
    renamed)."""
    src = Path(info["Dir"])
    dest = dest_root / src.name
    if dest.is_dir():
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = dest_root / f".{src.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=shutil.copy)
    for path in [tmp, *tmp.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------
# The components.


def _version(component: str, key: str = "version") -> str:
    value = artifacts.versions()[component][key]
    assert isinstance(value, str), f"versions.toml: {component}.{key} must be a string"
    return value


def _module(component: str) -> str:
    return _version(component, "module")


@dataclass
class KubeModule:
    """The generated wrapper module building k8s.io/kubernetes, and its version flags."""

    dir: Path
    ldflags: str


def kubernetes_module(ctx: StepContext) -> KubeModule:
    """work/kubernetes: wrapper go.mod generated from kubernetes' own (idempotent)."""
    version = _version("kubernetes")
    wrapper = ctx.work / "kubernetes"
    wrapper.mkdir(parents=True, exist_ok=True)
    info = go_mod_download(_module("kubernetes"), version, cwd=wrapper)
    upstream = parse_gomod(Path(info["GoMod"]).read_text())
    text = wrapper_gomod(upstream, version, _version("kubernetes", "staging"))
    if write_gomod(wrapper, text):
        say(f"  wrote {wrapper / 'go.mod'} ({len(staging_modules(upstream))} staging modules "
            f"at {_version('kubernetes', 'staging')})")
    flags = kube_version_ldflags(version, build_date=module_time(info))
    return KubeModule(dir=wrapper, ldflags=ldflags(*flags))


def kube_binary(package: str, output: str) -> Callable[[StepContext], None]:
    """A step building one Kubernetes command from the wrapper module."""

    def build(ctx: StepContext) -> None:
        kube = kubernetes_module(ctx)
        ctx.go_build([f"k8s.io/kubernetes/{package}"], cwd=kube.dir, ldflags_value=kube.ldflags,
                     tags=KUBE_TAGS, output=output)

    return build


def build_etcd(ctx: StepContext) -> None:
    """etcd and etcdctl from a wrapper module requiring both at the pinned version.

    etcd's server module has the etcd command's main package at its root
    (upstream's scripts/build.sh runs ``go build`` of ``.`` in server/), as etcdctl's
    module does; both go.mod files replace etcd's other modules with sibling
    directories, so they are built as dependencies, whose replace lines Go
    ignores, with the published modules of the same version.
    """
    version = _version("etcd")
    wrapper = ctx.work / "etcd"
    info = go_mod_download(_module("etcd"), version, cwd=ctx.work)
    go = parse_gomod(Path(info["GoMod"]).read_text()).go or "1.26"
    write_gomod(wrapper, etcd_wrapper_gomod(_module("etcd"), version, go))
    for package, output in ((_module("etcd"), "etcd"), (ETCDCTL_MODULE, "etcdctl")):
        ctx.go_build([package], cwd=wrapper, ldflags_value=ldflags(), output=output)


def _copied(ctx: StepContext, component: str) -> Path:
    info = go_mod_download(_module(component), _version(component), cwd=ctx.work)
    return copy_module(info, ctx.work / "src")


def build_containerd(ctx: StepContext) -> None:
    version = _version("containerd")
    src = _copied(ctx, "containerd")
    pkg = f"{_module('containerd')}/version"
    flags = ldflags(f"-X {pkg}.Version={version}", f"-X {pkg}.Package={_module('containerd')}")
    ctx.go_build(["./cmd/containerd", "./cmd/containerd-shim-runc-v2", "./cmd/ctr"], cwd=src,
                 ldflags_value=flags, tags=CONTAINERD_TAGS)


def _ensure_libseccomp() -> None:
    """libseccomp-dev and pkg-config for runc's cgo (apt-get, only when missing)."""
    found = subprocess.run(["pkg-config", "--exists", "libseccomp"], check=False,
                           capture_output=True) if shutil.which("pkg-config") else None
    if found is not None and found.returncode == 0:
        return
    say("  installing libseccomp-dev and pkg-config (runc links libseccomp)")
    apt_install("libseccomp-dev", "pkg-config")


def apt_install(*packages: str) -> None:
    """``apt-get install`` Debian packages; BuildError with apt's message on failure."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")


def build_runc(ctx: StepContext) -> None:
    """runc from source (cgo, libseccomp); Debian's runc package when that fails."""
    try:
        _ensure_libseccomp()
        src = _copied(ctx, "runc")
        ctx.go_build(["."], cwd=src, ldflags_value=ldflags(), tags=RUNC_TAGS, cgo=True,
                     output="runc")
    except (BuildError, OSError) as exc:
        say(f"  runc {_version('runc')} did not build ({str(exc).splitlines()[0]}); "
            "falling back to Debian's runc package")
        debian_runc(ctx)


def debian_runc(ctx: StepContext) -> None:
    """Copy Debian's runc (apt-get install runc when missing) into out_dir."""
    path = shutil.which("runc") or "/usr/sbin/runc"
    if not Path(path).is_file():
        apt_install("runc")
    shutil.copy(path, ctx.out_dir / "runc")


def build_crictl(ctx: StepContext) -> None:
    src = _copied(ctx, "cri-tools")
    flags = ldflags(f"-X {_module('cri-tools')}/pkg/version.Version={_version('cri-tools')}")
    ctx.go_build(["./cmd/crictl"], cwd=src, ldflags_value=flags, output="crictl")


def build_coredns(ctx: StepContext) -> None:
    src = _copied(ctx, "coredns")
    ctx.go_build(["."], cwd=src, ldflags_value=ldflags(), output="coredns")


def build_agnhost(ctx: StepContext) -> None:
    kube = kubernetes_module(ctx)
    info = go_mod_download(_module("kubernetes"), _version("kubernetes"), cwd=kube.dir)
    version_file = Path(info["Dir"]) / "test" / "images" / "agnhost" / "VERSION"
    agnhost_version = version_file.read_text().strip()
    ctx.go_build(["k8s.io/kubernetes/test/images/agnhost"], cwd=kube.dir,
                 ldflags_value=ldflags(f"-X main.Version={agnhost_version}"), output="agnhost")


def build_regression_74839(ctx: StepContext) -> None:
    """test/images/regression-issue-74839: the server of the Conntrack test
    "should drop INVALID conntrack entries" (a raw-socket TCP peer)."""
    kube = kubernetes_module(ctx)
    ctx.go_build(["k8s.io/kubernetes/test/images/regression-issue-74839"], cwd=kube.dir,
                 ldflags_value=ldflags(), output="regression-issue-74839")


def build_cni_plugins(ctx: StepContext) -> None:
    src = _copied(ctx, "cni-plugins")
    flags = ldflags(f"-X {_module('cni-plugins')}/pkg/utils/buildversion.BuildVersion="
                    f"{_version('cni-plugins')}")
    ctx.go_build(["./plugins/ipam/host-local", "./plugins/main/loopback"], cwd=src,
                 ldflags_value=flags)


def build_ginkgo(ctx: StepContext) -> None:
    kube = kubernetes_module(ctx)
    ctx.go_build(["github.com/onsi/ginkgo/v2/ginkgo"], cwd=kube.dir, ldflags_value=ldflags(),
                 output="ginkgo")


def build_e2e(ctx: StepContext) -> None:
    kube = kubernetes_module(ctx)
    ctx.go_build(["k8s.io/kubernetes/test/e2e"], cwd=kube.dir, ldflags_value=kube.ldflags,
                 output="e2e.test", test=True)


def build_network_policy_api(ctx: StepContext) -> None:
    """The network-policy-api conformance suite as test binaries, and test2json.

    The module is copied from the module cache (go mod download) into
    ``work/src/`` and its ``./conformance`` package compiled with ``go test
    -c`` and the module's own go.mod and go.sum. The ``-nosctp`` binary is the
    same source with conformance/base/manifests.yaml rewritten by
    policyapi.without_sctp_servers (the suite embeds its manifests, so the
    change needs its own build). test2json is the Go toolchain's command.
    """
    module, version = policyapi.pin()
    info = go_mod_download(module, version, cwd=ctx.work)
    src = copy_module(info, ctx.work / "src")
    ctx.go_build(["./conformance"], cwd=src, ldflags_value=ldflags(), test=True,
                 output=policyapi.BINARY)
    nosctp = ctx.work / "src" / f"{src.name}-nosctp"
    if not nosctp.is_dir():
        tmp = nosctp.with_name(f".{nosctp.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, nosctp)
    base = nosctp / policyapi.BASE_MANIFESTS
    write_if_changed(base, policyapi.without_sctp_servers(
        (src / policyapi.BASE_MANIFESTS).read_text()))
    ctx.go_build(["./conformance"], cwd=nosctp, ldflags_value=ldflags(), test=True,
                 output=policyapi.BINARY_NOSCTP)
    ctx.go("build", "-trimpath", "-ldflags", ldflags(), "-o", str(ctx.out_dir / "test2json"),
           "cmd/test2json", cwd=src)


@dataclass(frozen=True)
class Step:
    """One build step: its name (log, selection on the command line), its
    outputs in bin/, its build, and its stamp's name (the step's name unless
    the step is pinned outside versions.toml: then the name and that pin, so
    changing the pin rebuilds the step)."""

    name: str
    outputs: tuple[str, ...]
    build: Callable[[StepContext], None]
    stamp: str = ""

    @property
    def stamp_name(self) -> str:
        return self.stamp or self.name


STEPS: tuple[Step, ...] = (
    Step("etcd", ("etcd", "etcdctl"), build_etcd),
    Step("kube-apiserver", ("kube-apiserver",), kube_binary("cmd/kube-apiserver", "kube-apiserver")),
    Step("kube-controller-manager", ("kube-controller-manager",),
         kube_binary("cmd/kube-controller-manager", "kube-controller-manager")),
    Step("kube-scheduler", ("kube-scheduler",), kube_binary("cmd/kube-scheduler", "kube-scheduler")),
    Step("kubectl", ("kubectl",), kube_binary("cmd/kubectl", "kubectl")),
    Step("kubelet", ("kubelet",), kube_binary("cmd/kubelet", "kubelet")),
    Step("containerd", ("containerd", "containerd-shim-runc-v2", "ctr"), build_containerd),
    Step("runc", ("runc",), build_runc),
    Step("crictl", ("crictl",), build_crictl),
    Step("coredns", ("coredns",), build_coredns),
    Step("agnhost", ("agnhost",), build_agnhost),
    Step("regression-74839", ("regression-issue-74839",), build_regression_74839),
    Step("cni-plugins", ("host-local", "loopback"), build_cni_plugins),
    Step("kube-proxy", ("kube-proxy",), kube_binary("cmd/kube-proxy", "kube-proxy")),
    Step("ginkgo", ("ginkgo",), build_ginkgo),
    Step("e2e.test", ("e2e.test",), build_e2e),
    Step("network-policy-api", (policyapi.BINARY, policyapi.BINARY_NOSCTP, "test2json"),
         build_network_policy_api, stamp=f"network-policy-api@{policyapi.pin()[1]}"),
)


# --------------------------------------------------------------------------
# The driver.


def step_done(step: Step, cache: Path) -> bool:
    """True when ``step``'s stamp exists and all its outputs are in bin/."""
    if not (cache / "stamps" / step.stamp_name).is_file():
        return False
    return all((cache / "bin" / name).is_file() for name in step.outputs)


def run_step(step: Step, cache: Path) -> bool:
    """Build ``step`` unless done; True when it was built.

    Outputs are built in work/tmp/<step>/ and renamed into bin/ one by one,
    then the stamp is written, so an interrupted step leaves no stamp and
    never a partial binary in bin/. Raises BuildError.
    """
    if step_done(step, cache):
        return False
    work = cache / "work"
    out_dir = work / "tmp" / step.name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log_path = work / "logs" / f"{step.name}.log"
    log_path.write_text("")
    step.build(StepContext(name=step.name, out_dir=out_dir, log_path=log_path, work=work))
    missing = [name for name in step.outputs if not (out_dir / name).is_file()]
    if missing:
        raise BuildError(f"{step.name}: the build produced no {', '.join(missing)} in "
                         f"{out_dir} (log: {log_path})")
    bin_dir = cache / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in step.outputs:
        (out_dir / name).chmod(0o755)
        os.replace(out_dir / name, bin_dir / name)
    stamps = cache / "stamps"
    stamps.mkdir(parents=True, exist_ok=True)
    (stamps / step.stamp_name).touch()
    shutil.rmtree(out_dir, ignore_errors=True)
    return True


_HELD_LOCKS: set[Path] = set()


@contextmanager
def build_lock(cache: Path) -> Iterator[None]:
    """Hold the cache folder's lock (one `make k8s` at a time); says when waiting.

    Re-entrant within one process, so the images step may call build_all()
    again (a second flock on a new file would wait for ourselves forever).
    """
    key = cache.resolve()
    if key in _HELD_LOCKS:
        yield
        return
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".build.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another build holds {cache / '.build.lock'}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        _HELD_LOCKS.add(key)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(key)


def build_images() -> None:
    """The images step: pcn_lab.cluster.images.build_images() once that module exists."""
    if importlib.util.find_spec("pcn_lab.cluster.images") is None:
        say("images: not built yet (pcn_lab.cluster.images does not exist)")
        return
    images = importlib.import_module("pcn_lab.cluster.images")
    images.build_images()


def select_steps(only: Sequence[str] | None) -> list[Step]:
    """STEPS, or the named ones in build order. ValueError names unknown steps."""
    if not only:
        return list(STEPS)
    known = {step.name for step in STEPS}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(known)}")
    return [step for step in STEPS if step.name in only]


def run_steps(steps: Sequence[Step], cache: Path, *, images: bool = True) -> Path:
    """Run ``steps`` in order under the cache's lock, then the images step;
    returns bin/. Prints one line per step with its and the overall seconds.
    Raises BuildError."""
    start = time.monotonic()
    with build_lock(cache):
        say(f"building into {cache / 'bin'} (versions.toml key {cache.name})")
        for index, step in enumerate(steps, 1):
            step_start = time.monotonic()
            if not step_done(step, cache):
                say(f"{index}/{len(steps)} {step.name}: building {', '.join(step.outputs)}")
            built = run_step(step, cache)
            now = time.monotonic()
            what = f"built in {now - step_start:.0f} s" if built else "done before (stamp)"
            say(f"{index}/{len(steps)} {step.name}: {what} (total {now - start:.0f} s)")
        if images:
            build_images()
    say(f"all done in {time.monotonic() - start:.0f} s: {cache / 'bin'}")
    return cache / "bin"


def build_all(only: Sequence[str] | None = None, *, images: bool = True,
              cache: Path | None = None) -> Path:
    """Build every step (or those named in ``only``), then the images; returns bin/.

    Idempotent: done steps are skipped by their stamp, so a second call costs
    well under a second. Raises BuildError (naming the failed step's log) or
    ValueError (unknown step name).
    """
    steps = select_steps(only)
    cache = cache or artifacts.cache_dir()
    if shutil.which("go") is None and not all(step_done(step, cache) for step in steps):
        raise BuildError("`go` is not on PATH: install Go 1.26 (the components are built "
                         "from the Go module proxy)")
    return run_steps(steps, cache, images=images)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcn_lab.cluster.build",
                                     description="Build the pinned upstream components "
                                                 "(make k8s).")
    parser.add_argument("steps", nargs="*", help="only these steps (default: all, in order)")
    parser.add_argument("--no-images", action="store_true", help="skip the images step")
    parser.add_argument("--list", action="store_true", help="list the steps and their state")
    args = parser.parse_args(argv)
    # the images step reports through logging: without this it was silent
    # for minutes (a first build from an empty cache)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.list:
        for step in STEPS:
            state = "done" if step_done(step, artifacts.cache_dir()) else "to build"
            print(f"{step.name:<24} {state:<9} {' '.join(step.outputs)}")
        return 0
    try:
        build_all(args.steps or None, images=not args.no_images)
    except (BuildError, ValueError) as exc:
        say(f"FAILED: {exc}", out=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
