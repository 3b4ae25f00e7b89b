"""`make k8s` (pcn_lab.cluster.build): the pure parts without Go builds, and
the built binaries' versions when the cache has them (skipped otherwise)."""

from __future__ import annotations

import fcntl
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from pcn_lab.cluster import artifacts, build

KUBE_LIKE_GOMOD = """\
// This is a generated file. Do not edit directly.

module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
	github.com/onsi/ginkgo/v2 v2.32.0
	k8s.io/api v0.0.0
	k8s.io/client-go v0.0.0 // indirect
)

require github.com/single/line v1.2.3

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/client-go => ./staging/src/k8s.io/client-go // a comment
	github.com/forked/thing v1.0.0 => github.com/fork/thing v1.0.1
)

replace k8s.io/kubelet => ./staging/src/k8s.io/kubelet
"""


def test_parse_gomod_reads_blocks_single_lines_and_comments() -> None:
    mod = build.parse_gomod(KUBE_LIKE_GOMOD)
    assert mod.module == "k8s.io/kubernetes"
    assert mod.go == "1.26.0"
    assert mod.godebug == ("default=go1.26",)
    assert mod.requires == {"github.com/onsi/ginkgo/v2": "v2.32.0", "k8s.io/api": "v0.0.0",
                            "k8s.io/client-go": "v0.0.0", "github.com/single/line": "v1.2.3"}
    assert mod.replaces["k8s.io/client-go"] == "./staging/src/k8s.io/client-go"
    assert mod.replaces["github.com/forked/thing"] == "github.com/fork/thing v1.0.1"
    assert build.staging_modules(mod) == ["k8s.io/api", "k8s.io/client-go", "k8s.io/kubelet"]


def test_parse_gomod_refuses_text_without_module() -> None:
    with pytest.raises(ValueError, match="no module directive"):
        build.parse_gomod("go 1.26\n")


def test_wrapper_gomod_requires_upstream_and_replaces_only_staging() -> None:
    text = build.wrapper_gomod(build.parse_gomod(KUBE_LIKE_GOMOD), "v1.37.2", "v0.37.2")
    wrapper = build.parse_gomod(text)
    assert wrapper.module == build.WRAPPER_MODULE
    assert wrapper.go == "1.26.0"
    assert wrapper.godebug == ("default=go1.26",)
    assert wrapper.requires == {"k8s.io/kubernetes": "v1.37.2"}
    assert wrapper.replaces == {"k8s.io/api": "k8s.io/api v0.37.2",
                                "k8s.io/client-go": "k8s.io/client-go v0.37.2",
                                "k8s.io/kubelet": "k8s.io/kubelet v0.37.2"}


@pytest.mark.skipif(shutil.which("go") is None, reason="needs the go command")
def test_wrapper_gomod_is_valid_for_go(tmp_path: Path) -> None:
    """`go mod edit -json` (Go's own parser) reads the generated file the same way."""
    (tmp_path / "go.mod").write_text(
        build.wrapper_gomod(build.parse_gomod(KUBE_LIKE_GOMOD), "v1.37.2", "v0.37.2"))
    proc = subprocess.run(["go", "mod", "edit", "-json"], cwd=tmp_path, capture_output=True,
                          text=True, check=True, env={**os.environ, "GOTOOLCHAIN": "local"})
    parsed = json.loads(proc.stdout)
    assert parsed["GoDebug"] == [{"Key": "default", "Value": "go1.26"}]
    assert {r["Old"]["Path"]: r["New"] for r in parsed["Replace"]}["k8s.io/api"] == \
        {"Path": "k8s.io/api", "Version": "v0.37.2"}


def test_etcd_wrapper_requires_server_and_etcdctl_at_one_version() -> None:
    mod = build.parse_gomod(build.etcd_wrapper_gomod("go.etcd.io/etcd/server/v3", "v3.7.3",
                                                     "1.26.0"))
    assert mod.go == "1.26.0"
    assert mod.requires == {"go.etcd.io/etcd/server/v3": "v3.7.3",
                            "go.etcd.io/etcd/etcdctl/v3": "v3.7.3"}
    assert not mod.replaces


def test_kube_version_ldflags_set_both_version_packages() -> None:
    flags = build.kube_version_ldflags("v1.37.2", commit="abc", build_date="2026-10-27T12:01:04Z")
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {package}.gitVersion=v1.37.2" in flags
        assert f"-X {package}.gitMajor=1" in flags
        assert f"-X {package}.gitMinor=37" in flags
        assert f"-X {package}.gitTreeState=clean" in flags
        assert f"-X {package}.gitCommit=abc" in flags
        assert f"-X {package}.buildDate=2026-10-27T12:01:04Z" in flags
    assert not any("gitCommit" in flag for flag in build.kube_version_ldflags("v1.37.2"))
    assert build.ldflags(*flags).startswith("-s -w -X k8s.io/component-base/version.")


def test_kube_version_ldflags_refuse_a_bare_number() -> None:
    with pytest.raises(ValueError, match="vMAJOR.MINOR.PATCH"):
        build.kube_version_ldflags("1.37")


def test_write_gomod_keeps_what_go_added(tmp_path: Path) -> None:
    assert build.write_gomod(tmp_path, "module a\n")
    (tmp_path / "go.mod").write_text("module a\n\nrequire added v1.0.0\n")  # as `go build -mod=mod`
    assert not build.write_gomod(tmp_path, "module a\n")
    assert "added" in (tmp_path / "go.mod").read_text()
    assert build.write_gomod(tmp_path, "module b\n")
    assert (tmp_path / "go.mod").read_text() == "module b\n"


def _fake_step(calls: list[str], name: str = "fake", fail_after_writing: bool = False
               ) -> build.Step:
    def run(ctx: build.StepContext) -> None:
        calls.append(name)
        (ctx.out_dir / "one").write_text("new one")
        if fail_after_writing:
            raise build.BuildError("half way")
        (ctx.out_dir / "two").write_text("new two")

    return build.Step(name, ("one", "two"), run)


def test_steps_are_skipped_by_their_stamp(tmp_path: Path) -> None:
    calls: list[str] = []
    step = _fake_step(calls)
    build.run_steps([step], tmp_path, images=False)
    assert calls == ["fake"]
    assert (tmp_path / "stamps" / "fake").is_file()
    assert (tmp_path / "bin" / "two").read_text() == "new two"
    assert os.access(tmp_path / "bin" / "two", os.X_OK)
    build.run_steps([step], tmp_path, images=False)
    assert calls == ["fake"], "a stamped step ran again"
    (tmp_path / "bin" / "one").unlink()
    build.run_steps([step], tmp_path, images=False)
    assert calls == ["fake", "fake"], "a stamped step whose output is gone was not rebuilt"


def test_a_failed_step_leaves_no_stamp_and_no_partial_output(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "one").write_text("old one")
    calls: list[str] = []
    with pytest.raises(build.BuildError, match="half way"):
        build.run_steps([_fake_step(calls, fail_after_writing=True)], tmp_path, images=False)
    assert not (tmp_path / "stamps" / "fake").exists()
    assert (tmp_path / "bin" / "one").read_text() == "old one"
    assert not (tmp_path / "bin" / "two").exists()


def test_a_step_that_misses_an_output_fails_naming_it(tmp_path: Path) -> None:
    step = build.Step("short", ("one", "missing"), _fake_step([]).build)
    with pytest.raises(build.BuildError, match="produced no missing"):
        build.run_steps([step], tmp_path, images=False)
    assert not (tmp_path / "stamps" / "short").exists()


def test_a_failed_command_reports_its_log_tail_and_path(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    ctx = build.StepContext(name="s", out_dir=tmp_path, log_path=log, work=tmp_path)
    with pytest.raises(build.BuildError) as failure:
        ctx.run([sys.executable, "-c", "print('compiling'); print('boom: undefined'); exit(3)"],
                cwd=tmp_path)
    message = str(failure.value)
    assert "exited 3" in message and "boom: undefined" in message and str(log) in message
    assert "compiling" in log.read_text()


def test_select_steps_keeps_build_order_and_names_unknown_ones() -> None:
    names = [step.name for step in build.select_steps(["e2e.test", "etcd"])]
    assert names == ["etcd", "e2e.test"]
    with pytest.raises(ValueError, match="unknown step"):
        build.select_steps(["kube-nothing"])


def test_steps_come_in_the_promised_order() -> None:
    outputs = [name for step in build.STEPS for name in step.outputs]
    assert outputs == [
        "etcd", "etcdctl", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
        "kubectl", "kubelet", "containerd", "containerd-shim-runc-v2", "ctr", "runc", "crictl",
        "coredns", "agnhost", "regression-issue-74839", "host-local", "loopback", "kube-proxy", "ginkgo", "e2e.test",
        "network-policy-api-conformance.test", "network-policy-api-conformance-nosctp.test",
        "test2json"]


def test_images_step_says_so_when_the_images_module_is_absent(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    build.build_images()
    assert "images: not built yet" in capsys.readouterr().out


def test_images_step_calls_build_images_after_the_binaries(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    fake = types.ModuleType("pcn_lab.cluster.images")
    fake.__spec__ = importlib.machinery.ModuleSpec("pcn_lab.cluster.images", None)
    fake.build_images = lambda: calls.append("images")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pcn_lab.cluster.images", fake)
    build.run_steps([_fake_step(calls)], tmp_path)
    assert calls == ["fake", "images"]
    build.run_steps([_fake_step(calls)], tmp_path, images=False)
    assert calls == ["fake", "images"]


def test_the_images_step_may_call_build_again_without_waiting_for_itself(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    fake = types.ModuleType("pcn_lab.cluster.images")
    fake.__spec__ = importlib.machinery.ModuleSpec("pcn_lab.cluster.images", None)
    fake.build_images = lambda: build.run_steps([_fake_step(calls, "inner")], tmp_path,  # type: ignore[attr-defined]
                                                images=False)
    monkeypatch.setitem(sys.modules, "pcn_lab.cluster.images", fake)
    # In a thread, so a lock that waits for itself fails the test instead of hanging it.
    runner = threading.Thread(target=build.run_steps, args=([_fake_step(calls)], tmp_path),
                              daemon=True)
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "the nested build waits for the outer build's lock"
    assert calls == ["fake", "inner"]


def test_a_second_process_waits_for_the_lock(tmp_path: Path) -> None:
    with build.build_lock(tmp_path), (tmp_path / ".build.lock").open("w") as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with (tmp_path / ".build.lock").open("w") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------------------
# The built binaries (after `make k8s`).


def _v(component: str) -> str:
    return str(artifacts.versions()[component]["version"])


def _agnhost_version() -> str:
    # The VERSION file next to agnhost's sources, in the module cache.
    kube = artifacts.versions()["kubernetes"]
    path = (Path.home() / "go" / "pkg" / "mod" / f"{kube['module']}@{kube['version']}" / "test"
            / "images" / "agnhost" / "VERSION")
    return path.read_text().strip() if path.is_file() else " version "


VERSION_CHECKS: list[tuple[str, list[str], dict[str, str], str]] = [
    ("etcd", ["--version"], {}, f"etcd Version: {_v('etcd').lstrip('v')}"),
    ("etcdctl", ["version"], {}, f"etcdctl version: {_v('etcd').lstrip('v')}"),
    ("kube-apiserver", ["--version"], {}, f"Kubernetes {_v('kubernetes')}"),
    ("kube-controller-manager", ["--version"], {}, f"Kubernetes {_v('kubernetes')}"),
    ("kube-scheduler", ["--version"], {}, f"Kubernetes {_v('kubernetes')}"),
    ("kubectl", ["version", "--client"], {}, f"Client Version: {_v('kubernetes')}"),
    ("kubelet", ["--version"], {}, f"Kubernetes {_v('kubernetes')}"),
    ("containerd", ["--version"], {}, f" {_v('containerd')}"),
    ("containerd-shim-runc-v2", ["-v"], {}, f"Version:  {_v('containerd')}"),
    ("ctr", ["--version"], {}, f" {_v('containerd')}"),
    ("runc", ["--version"], {}, f"runc version {_v('runc').lstrip('v')}"),
    ("crictl", ["--version"], {}, f"crictl version {_v('cri-tools')}"),
    ("coredns", ["-version"], {}, f"CoreDNS-{_v('coredns').lstrip('v')}"),
    ("agnhost", ["--version"], {}, _agnhost_version()),
    ("host-local", [], {}, f"CNI host-local plugin {_v('cni-plugins')}"),
    ("loopback", [], {}, f"CNI loopback plugin {_v('cni-plugins')}"),
    ("kube-proxy", ["--version"], {}, f"Kubernetes {_v('kubernetes')}"),
    ("ginkgo", ["version"], {}, "Ginkgo Version 2."),
    ("e2e.test", ["--version"], {}, _v("kubernetes")),
]


@pytest.mark.parametrize(("name", "args", "env", "expected"), VERSION_CHECKS,
                         ids=[check[0] for check in VERSION_CHECKS])
def test_built_binary_prints_the_pinned_version(name: str, args: list[str], env: dict[str, str],
                                                expected: str) -> None:
    path = artifacts.bin_dir() / name
    if not path.is_file():
        pytest.skip(f"{path} is not built: run `make k8s`")
    proc = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, check=False)
    output = proc.stdout + proc.stderr
    assert expected in output, f"{name} {' '.join(args)} printed:\n{output}"


def test_ginkgo_is_the_version_kubernetes_requires() -> None:
    path = artifacts.bin_dir() / "ginkgo"
    kube = artifacts.versions()["kubernetes"]
    gomod = (Path.home() / "go" / "pkg" / "mod" / f"{kube['module']}@{kube['version']}"
             / "go.mod")
    if not path.is_file() or not gomod.is_file():
        pytest.skip(f"{path} is not built: run `make k8s`")
    wanted = build.parse_gomod(gomod.read_text()).requires["github.com/onsi/ginkgo/v2"]
    proc = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=60,
                          check=True)
    assert f"Ginkgo Version {wanted.lstrip('v')}" in proc.stdout
