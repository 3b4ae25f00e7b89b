"""The image builder of the real-cluster lab (pcn_lab.cluster): the OCI
archive writer, the Dockerfile interpreter's parsing of manifests/Dockerfile
and its COPY/ENV/WORKDIR semantics, .dockerignore matching, and (when `make
k8s` built containerd) an import with a real containerd's ``ctr``. No root
filesystem is built here (that is `make k8s`)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcn_lab.cluster import artifacts, dockerfile, images, oci

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "manifests" / "Dockerfile"


# ------------------------------------------------------------------ OCI writer

def _sample_root(base: Path) -> Path:
    root = base / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "dev").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "etc" / "config").write_text("a=1\n")
    os.link(root / "bin" / "tool", root / "bin" / "tool2")
    (root / "bin" / "sh").symlink_to("tool")
    (root / "dev" / "leftover").write_text("not for the image")
    return root


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def _blob(members: dict[str, bytes], digest: str) -> bytes:
    return members["blobs/sha256/" + digest.split(":", 1)[1]]


def _build(base: Path, root: Path, ref: str) -> tuple[Path, oci.Blob]:
    archive = base / "image.tar"
    config = oci.ImageConfig(entrypoint=["/bin/tool"], cmd=["run"], working_dir="/work",
                             labels={"b": "2", "a": "1"}, env=["PATH=/bin", "X=1"])
    manifest = oci.build_archive(archive, root, ref, config, blobs=base / "blobs")
    return archive, manifest


def test_archive_layout_digests_sizes_and_diff_ids(tmp_path: Path) -> None:
    ref = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
    archive, manifest_blob = _build(tmp_path, _sample_root(tmp_path), ref)
    members = _members(archive)
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in members.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1], name

    index = json.loads(members["index.json"])
    assert index["schemaVersion"] == 2 and index["mediaType"] == oci.MEDIA_INDEX
    (entry,) = index["manifests"]
    assert entry["annotations"] == {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": "2.66.1"}
    assert entry["digest"] == manifest_blob.digest
    manifest_data = _blob(members, entry["digest"])
    assert entry["size"] == len(manifest_data)

    manifest = json.loads(manifest_data)
    assert manifest["mediaType"] == oci.MEDIA_MANIFEST
    config_data = _blob(members, manifest["config"]["digest"])
    assert manifest["config"]["size"] == len(config_data)
    config = json.loads(config_data)
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    assert config["config"]["Entrypoint"] == ["/bin/tool"] and config["config"]["Cmd"] == ["run"]
    assert config["config"]["WorkingDir"] == "/work" and config["config"]["Env"] == ["PATH=/bin", "X=1"]
    assert config["config"]["Labels"] == {"a": "1", "b": "2"}

    (layer_desc,) = manifest["layers"]
    assert layer_desc["mediaType"] == oci.MEDIA_LAYER_GZIP
    layer = _blob(members, layer_desc["digest"])
    assert layer_desc["size"] == len(layer)
    plain = gzip.decompress(layer)
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(plain).hexdigest()]}

    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        entries = tar.getmembers()
    names = [m.name.rstrip("/") for m in entries]
    assert names == sorted(names)
    assert "dev" in names and "dev/leftover" not in names
    by_name = {m.name.rstrip("/"): m for m in entries}
    assert by_name["bin/sh"].issym() and by_name["bin/sh"].linkname == "tool"
    assert by_name["bin/tool2"].islnk() and by_name["bin/tool2"].linkname == "bin/tool"
    assert by_name["bin/tool"].mode == 0o755
    assert all(m.uname == "" and m.gname == "" and m.mtime <= oci.DEFAULT_EPOCH for m in entries)


def test_archive_is_reproducible_and_follows_content(tmp_path: Path) -> None:
    root = _sample_root(tmp_path)
    first, manifest1 = _build(tmp_path / "one", root, "example.org/a:1")
    first_bytes = first.read_bytes()
    os.utime(root / "etc" / "config", (time.time(), time.time()))  # newer than the epoch: clamped
    second, manifest2 = _build(tmp_path / "two", root, "example.org/a:1")
    assert manifest1.digest == manifest2.digest
    assert first_bytes == second.read_bytes()
    (root / "etc" / "config").write_text("a=2\n")
    _, manifest3 = _build(tmp_path / "three", root, "example.org/a:1")
    assert manifest3.digest != manifest1.digest


def test_layer_keeps_package_times_and_fixes_build_times(tmp_path: Path) -> None:
    root = _sample_root(tmp_path)
    shipped = 1_600_000_000  # a file as a package shipped it: older than the build
    os.utime(root / "etc" / "config", (shipped, shipped))
    (root / "var" / "cache" / "ldconfig").mkdir(parents=True)
    (root / "var" / "cache" / "ldconfig" / "aux-cache").write_text("inodes")
    layer = oci.write_layer(root, tmp_path / "blobs", epoch=1_700_000_000, clamp_from=1_650_000_000)
    plain = gzip.decompress((tmp_path / "blobs" / layer.blob.digest[7:]).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        by_name = {m.name.rstrip("/"): m for m in tar.getmembers()}
    assert by_name["etc/config"].mtime == shipped
    assert by_name["bin/tool"].mtime == 1_700_000_000  # made now, by the build
    assert "var/cache/ldconfig/aux-cache" not in by_name and "var/cache/ldconfig" in by_name


def test_tag_of() -> None:
    assert oci.tag_of("registry.k8s.io/pause:3.10.2") == "3.10.2"
    assert oci.tag_of("localhost:5000/x") == "latest"
    assert oci.tag_of("docker.io/library/pcn-agent:0.1.0") == "0.1.0"


# ------------------------------------------------------- Dockerfile parsing

def test_parse_manifests_dockerfile_stages() -> None:
    parsed = dockerfile.parse(DOCKERFILE)
    assert parsed.global_args == {"DEBIAN": "debian:12-slim"}
    assert [(s.index, s.name, s.base) for s in parsed.stages] == [
        (0, "base", "debian:12-slim"), (1, "build", "base"), (2, None, "base")]
    build = parsed.stages[1]
    assert [i.cmd for i in build.instructions] == [
        "RUN", "RUN", "WORKDIR", "COPY", "COPY", "COPY", "COPY", "COPY", "RUN", "COPY", "RUN"]
    assert build.instructions[3].args == ("pyproject.toml", "setup.cfg", "README.md", "./")
    final = parsed.stages[2]
    copy = next(i for i in final.instructions if i.cmd == "COPY")
    assert copy.flag("from") == "build" and copy.args == ("/opt/pcn", "/opt/pcn")
    entry = final.instructions[-1]
    assert entry.cmd == "ENTRYPOINT" and entry.json and entry.args == ("/opt/pcn/venv/bin/pcn-agent",)
    # every instruction the file uses is one the interpreter builds
    for stage in parsed.stages:
        for ins in stage.instructions:
            assert hasattr(dockerfile.Builder, f"_do_{ins.cmd.lower()}"), ins


def test_parse_build_arg_overrides_global_arg() -> None:
    parsed = dockerfile.parse(DOCKERFILE, {"DEBIAN": "debian:bookworm-slim"})
    assert parsed.stages[0].base == "debian:bookworm-slim"
    assert parsed.stage("build") is parsed.stages[1] and parsed.stage("1") is parsed.stages[1]


def test_parse_rejects_what_it_cannot_build(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text("RUN true\nFROM x\n")
    with pytest.raises(dockerfile.DockerfileError, match="before the first FROM"):
        dockerfile.parse(path)


@pytest.mark.parametrize(("word", "expected"), [
    ("$A", "a"), ("${A}b", "ab"), ("x${NONE:-dflt}y", "xdflty"), ("${A:+set}", "set"),
    ("${NONE:+set}", ""), ('"quoted $A"', "quoted a"), ("'single $A'", "single $A"),
    ("\\$A", "$A"), ('"a\\"b"', 'a"b'), ("/opt/pcn/venv/bin:$PATH", "/opt/pcn/venv/bin:/usr/bin"),
    ("$", "$"), ("${EMPTY:-x}", "x"), ("${EMPTY-x}", ""),
])
def test_expand(word: str, expected: str) -> None:
    assert dockerfile.expand(word, {"A": "a", "PATH": "/usr/bin", "EMPTY": ""}) == expected


def test_expand_errors() -> None:
    with pytest.raises(dockerfile.DockerfileError):
        dockerfile.expand('"open', {})
    with pytest.raises(dockerfile.DockerfileError):
        dockerfile.expand("${OPEN", {})


def test_dockerignore_keeps_what_the_image_needs() -> None:
    patterns = dockerfile.read_dockerignore(DOCKERFILE.with_name("Dockerfile.dockerignore"))
    files = dockerfile.context_files(ROOT, patterns)
    assert {"pyproject.toml", "setup.cfg", "README.md", "manifests/cni/bundle.py",
            "manifests/cni/install.py", "operator/pcn_agent/__init__.py", "crds/__init__.py"} <= set(files)
    assert not [f for f in files if f.startswith((".venv/", ".git/", "tests/", "bench/"))]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or ".egg-info" in f]
    assert "manifests/daemonset.yaml" not in files


def test_context_digest_follows_content(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    first = dockerfile.context_digest(tmp_path, ["a"], tmp_path / "Dockerfile")
    assert first == dockerfile.context_digest(tmp_path, ["a"], tmp_path / "Dockerfile")
    (tmp_path / "a").write_text("2")
    assert first != dockerfile.context_digest(tmp_path, ["a"], tmp_path / "Dockerfile")


# ----------------------------------------------- building without RUN steps

def test_builder_copy_env_workdir_label(tmp_path: Path) -> None:
    context = tmp_path / "context"
    (context / "pkg" / "sub").mkdir(parents=True)
    (context / "pkg" / "sub" / "m.py").write_text("x = 1\n")
    (context / "pkg" / "skip.pyc").write_text("")
    (context / "top.txt").write_text("top\n")
    (context / ".dockerignore").write_text("**/*.pyc\n")
    (context / "Dockerfile").write_text(
        "ARG BASE=empty\n"
        "FROM ${BASE} AS one\n"
        "ARG WHERE=/src\n"
        "WORKDIR $WHERE\n"
        "COPY top.txt pkg ./\n"
        "COPY pkg ./pkg\n"
        "FROM empty\n"
        'LABEL title="a b" other=c\n'
        "ENV PATH=/opt/bin:$PATH \\\n    MODE=1\n"
        "COPY --from=one /src /app\n"
        'ENTRYPOINT ["/app/run"]\n')
    bases: list[str] = []

    def resolve(reference: str, dest: Path) -> oci.ImageConfig:
        bases.append(reference)
        dest.mkdir(parents=True)
        return oci.ImageConfig(cmd=["bash"], env=["PATH=/usr/bin"])

    parsed = dockerfile.parse(context / "Dockerfile")
    files = dockerfile.context_files(context, dockerfile.read_dockerignore(context / ".dockerignore"))
    assert files == [".dockerignore", "Dockerfile", "pkg/sub/m.py", "top.txt"]
    builder = dockerfile.Builder(parsed=parsed, context=context, context_list=files, work=tmp_path / "work",
                                 resolve_base=resolve)
    final = builder.build()
    assert bases == ["empty", "empty"]
    one = builder.states[0].root
    # several sources: into the folder; a folder source: its contents
    assert (one / "src" / "top.txt").read_text() == "top\n"
    assert (one / "src" / "sub" / "m.py").is_file() and (one / "src" / "pkg" / "sub" / "m.py").is_file()
    assert not (one / "src" / "skip.pyc").exists()
    assert (final.root / "app" / "pkg" / "sub" / "m.py").is_file()
    assert final.config.labels == {"title": "a b", "other": "c"}
    assert final.config.env == ["PATH=/opt/bin:/usr/bin", "MODE=1"]
    assert final.config.entrypoint == ["/app/run"] and final.config.cmd is None
    assert builder.states[0].config.working_dir == "/src"


def test_builder_reports_missing_copy_source(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM empty\nCOPY nothere /x\n")

    def resolve(reference: str, dest: Path) -> oci.ImageConfig:
        dest.mkdir(parents=True)
        return oci.ImageConfig()

    builder = dockerfile.Builder(parsed=dockerfile.parse(tmp_path / "Dockerfile"), context=tmp_path,
                                 context_list=["Dockerfile"], work=tmp_path / "work", resolve_base=resolve)
    with pytest.raises(dockerfile.DockerfileError, match="line 2: COPY nothere: not in the build context"):
        builder.build()


def test_every_image_has_a_distinct_archive_and_the_e2e_names() -> None:
    refs = [ref for recipe in images.recipes() for ref in recipe.refs] + [images.AGENT_REF]
    files = [images._archive_name(ref) for ref in refs]
    assert len(set(files)) == len(files)
    assert "registry.k8s.io/pause:3.10.2" in refs
    assert "registry.k8s.io/e2e-test-images/agnhost:2.66.1" in refs
    # the Conntrack test's server (no registry here: a missing one is ImagePullBackOff)
    assert "registry.k8s.io/e2e-test-images/regression-issue-74839:1.5" in refs
    assert images.AGENT_REF == "docker.io/library/pcn-agent:0.1.0"


# ------------------------------------------------- a real containerd import

def _containerd_binaries() -> tuple[Path, Path]:
    containerd, ctr = artifacts.bin_dir() / "containerd", artifacts.bin_dir() / "ctr"
    if not (containerd.is_file() and ctr.is_file()):
        pytest.skip(f"no containerd/ctr in {artifacts.bin_dir()}: run `make k8s` first")
    return containerd, ctr


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A containerd of its own (temporary root, state and socket)."""
    daemon, ctr = _containerd_binaries()
    base = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
    sock = str(base / "c.sock")
    config = base / "config.toml"
    config.write_text(
        "version = 3\n"
        f'root = "{base}/root"\nstate = "{base}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", '
        '"io.containerd.cri.v1.images", "io.containerd.nri.v1.nri"]\n'
        f'[grpc]\n  address = "{sock}"\n'
        f'[ttrpc]\n  address = "{sock}.ttrpc"\n')
    log = open(base / "containerd.log", "wb")
    proc = subprocess.Popen([str(daemon), "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"containerd exited: {(base / 'containerd.log').read_text()[-2000:]}")
            if subprocess.run([str(ctr), "-a", sock, "version"], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("containerd did not answer within 30 s")
        yield ctr, sock
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if str(base) in line]
        for line in reversed(mounts):
            subprocess.run(["umount", line.split()[1]], check=False)
        shutil.rmtree(base, ignore_errors=True)
        assert not mounts, f"containerd left mounts: {mounts}"


def test_ctr_imports_an_archive_under_its_name(tmp_path: Path, containerd: tuple[Path, str]) -> None:
    ctr, sock = containerd
    ref = "registry.k8s.io/e2e-test-images/pcn-test:1.0"
    archive, manifest = _build(tmp_path, _sample_root(tmp_path), ref)
    run = [str(ctr), "-a", sock, "-n", "k8s.io"]
    imported = subprocess.run([*run, "images", "import", str(archive)], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    names = subprocess.run([*run, "images", "ls", "-q"], capture_output=True, text=True, check=True).stdout.split()
    assert ref in names
    check = subprocess.run([*run, "images", "check", f"name=={ref}"], capture_output=True, text=True, check=True)
    line = next(row for row in check.stdout.splitlines() if row.startswith(ref))
    assert "complete" in line and manifest.digest in subprocess.run(
        [*run, "images", "ls"], capture_output=True, text=True, check=True).stdout


def test_wait_for_binaries_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCN_K8S_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"agnhost missing in .*: run `make k8s` first"):
        images._wait_for(("agnhost",), 0)
    artifacts.bin_dir().mkdir(parents=True)
    (artifacts.bin_dir() / "agnhost").write_bytes(b"\x7fELF")
    images._wait_for(("agnhost",), 0)
    images._wait_for(("agnhost",), 30)  # present and not growing: returns after one settle check
