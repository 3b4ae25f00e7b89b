"""OCI image archives written in Python: a root filesystem folder in, a tar
that ``ctr -n k8s.io images import`` takes (under its full name) out.

Why not umoci or go-containerregistry: both would have to be built from the
Go module proxy before the first image, and what they would do for us here is
small (one tar of a folder, three JSON documents, a tar of those); writing it
keeps the images buildable while the Go components are still compiling and
keeps the reproducibility rules (below) in one place we test.

Layout written (OCI image-layout 1.0.0, image-spec 1.1):

* ``oci-layout``: ``{"imageLayoutVersion": "1.0.0"}``;
* ``index.json``: one manifest descriptor per reference, annotated with
  ``io.containerd.image.name`` (the full reference: containerd's importer,
  ``core/transfer/image/imagestore.go`` ``imageName`` and
  ``client/import.go``, names the image after it) and
  ``org.opencontainers.image.ref.name`` (the tag alone, as containerd's own
  exporter writes it);
* ``blobs/sha256/<hex>``: the config, the manifest and the gzip layers.

Reproducible: layer entries sorted by path, owners numeric (no user or group
names), modification times from ``clamp_from`` on (what the build itself
created or changed) set to ``epoch`` while older ones (files as Debian's
packages ship them) are kept, so the byte-compiled Python files that
packages generate at install time, which record their source's time, stay
valid; gzip headers without name or time, archive members sorted with fixed
times. The same folder gives the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

#: 2026-01-01T00:00:00Z: the default clamp for modification times.
DEFAULT_EPOCH = 1767225600

#: Extended attributes carried into layers (file capabilities, e.g. ping's).
_KEPT_XATTRS = ("security.capability",)


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob on disk: ``digest`` is ``sha256:<hex>``."""

    digest: str
    size: int
    media_type: str

    def descriptor(self, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if annotations:
            desc["annotations"] = dict(sorted(annotations.items()))
        return desc


@dataclass(frozen=True)
class Layer:
    """A gzip layer blob and its ``diff_id`` (sha256 of the uncompressed tar)."""

    blob: Blob
    diff_id: str


@dataclass
class ImageConfig:
    """The runtime part of an image config (image-spec ``config`` object)."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Env": list(self.env)}
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            out["Cmd"] = list(self.cmd)
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.user:
            out["User"] = self.user
        if self.labels:
            out["Labels"] = dict(sorted(self.labels.items()))
        if self.exposed_ports:
            out["ExposedPorts"] = {p: {} for p in sorted(self.exposed_ports)}
        return out


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through it on its way to ``sink``."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        self.sink.write(view)
        return len(view)


def _sorted_entries(root: Path, skip_contents: frozenset[str]) -> list[tuple[str, Path]]:
    """(archive name, path) of everything under ``root`` (not following
    symbolic links), sorted by name; the contents of the ``skip_contents``
    folders (relative names) left out."""
    entries: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel + "/"
        if rel in skip_contents:
            dirs[:] = []
            continue
        for name in dirs + files:
            entries.append((prefix + name, Path(folder, name)))
    entries.sort(key=lambda e: e[0])
    return entries


def _tarinfo(name: str, path: Path, st: os.stat_result, epoch: int, clamp_from: float,
             hardlinks: dict[tuple[int, int], str]) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = epoch if st.st_mtime >= clamp_from else int(st.st_mtime)
    if stat.S_ISDIR(st.st_mode):
        info.type, info.name = tarfile.DIRTYPE, name + "/"
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in hardlinks:
            info.type, info.linkname = tarfile.LNKTYPE, hardlinks[key]
        else:
            if st.st_nlink > 1:
                hardlinks[key] = name
            info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        raise ValueError(f"{path}: sockets cannot go into an image layer")
    xattrs: dict[str, str] = {}
    for attr in _KEPT_XATTRS:
        try:
            value = os.getxattr(path, attr, follow_symlinks=False)
        except OSError:
            continue
        xattrs[f"SCHILY.xattr.{attr}"] = value.decode("latin-1")
    if xattrs:
        info.pax_headers = xattrs
    return info


def write_layer(root: Path, blobs: Path, *, epoch: int = DEFAULT_EPOCH, clamp_from: float | None = None,
                skip_contents: Iterable[str] = ("dev", "proc", "sys"),
                skip: Iterable[str] = ("var/cache/ldconfig/aux-cache",),
                compresslevel: int = 6) -> Layer:
    """Write the folder ``root`` as one gzip layer into ``blobs`` (the
    ``blobs/sha256`` folder). Entries are relative (``etc/passwd``), sorted;
    folders named in ``skip_contents`` (relative paths) are kept empty and
    the files of ``skip`` left out (ldconfig's aux-cache records inodes and
    times: a cache, never the same twice). Modification times at or after
    ``clamp_from`` (a Unix time; default ``epoch``) become ``epoch``.
    Returns the blob and its diff_id. Raises ValueError on a socket."""
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".layer-{os.getpid()}.tmp"
    empty = frozenset(s.strip("/") for s in skip_contents)
    left_out = frozenset(s.strip("/") for s in skip)
    since = float(epoch) if clamp_from is None else clamp_from
    hardlinks: dict[tuple[int, int], str] = {}
    with open(tmp, "wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed,  # type: ignore[arg-type]
                           compresslevel=compresslevel, mtime=0) as gz:
            plain = _HashingWriter(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for name, path in _sorted_entries(root, empty):
                    if name in left_out:
                        continue
                    st = path.lstat()
                    info = _tarinfo(name, path, st, epoch, since, hardlinks)
                    if info.type == tarfile.REGTYPE:
                        with open(path, "rb") as fh:
                            tar.addfile(info, fh)
                    else:
                        tar.addfile(info)
    digest = "sha256:" + compressed.sha.hexdigest()
    os.replace(tmp, blobs / compressed.sha.hexdigest())
    return Layer(Blob(digest, compressed.size, MEDIA_LAYER_GZIP), "sha256:" + plain.sha.hexdigest())


def write_json_blob(blobs: Path, document: dict[str, Any], media_type: str) -> Blob:
    """Store ``document`` as canonical JSON (sorted keys, no spaces) in ``blobs``."""
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    hexdigest = hashlib.sha256(data).hexdigest()
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / hexdigest).write_bytes(data)
    return Blob(f"sha256:{hexdigest}", len(data), media_type)


def tag_of(reference: str) -> str:
    """The tag of ``registry/repo:tag`` (``latest`` when there is none)."""
    last = reference.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def write_image(blobs: Path, layers: list[Layer], config: ImageConfig, *,
                created: int = DEFAULT_EPOCH) -> Blob:
    """Write the config and manifest blobs of a linux/amd64 image; returns the
    manifest's blob."""
    from datetime import UTC, datetime

    stamp = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config_doc = {
        "created": stamp,
        "architecture": "amd64",
        "os": "linux",
        "config": config.to_json(),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": stamp, "created_by": "pcn_lab.cluster.images"} for _ in layers],
    }
    config_blob = write_json_blob(blobs, config_doc, MEDIA_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer.blob.descriptor() for layer in layers],
    }
    return write_json_blob(blobs, manifest, MEDIA_MANIFEST)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_archive(path: Path, blobs: Path, images: dict[str, Blob]) -> None:
    """Write the OCI archive ``path`` naming each manifest of ``images``
    (``{reference: manifest blob}``) with its full reference; the blobs the
    manifests use are read from ``blobs``. Written to a temporary name and
    renamed, so a reader never sees half an archive."""
    needed: set[str] = set()
    for manifest in images.values():
        needed.add(manifest.digest)
        doc = json.loads((blobs / manifest.digest.split(":", 1)[1]).read_bytes())
        needed.add(doc["config"]["digest"])
        needed.update(layer["digest"] for layer in doc["layers"])
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {**blob.descriptor({ANNOTATION_CONTAINERD_NAME: ref, ANNOTATION_REF_NAME: tag_of(ref)}),
             "platform": {"architecture": "amd64", "os": "linux"}}
            for ref, blob in sorted(images.items())
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tar, "index.json", json.dumps(index, sort_keys=True, separators=(",", ":")).encode())
        for digest in sorted(needed):
            hexdigest = digest.split(":", 1)[1]
            source = blobs / hexdigest
            info = tarfile.TarInfo(f"blobs/sha256/{hexdigest}")
            info.size, info.mode, info.mtime = source.stat().st_size, 0o644, 0
            with open(source, "rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, path)


def build_archive(path: Path, root: Path, reference: str, config: ImageConfig, *,
                  blobs: Path, epoch: int = DEFAULT_EPOCH, clamp_from: float | None = None) -> Blob:
    """One image from one folder: the layer, config, manifest and the archive
    ``path`` naming it ``reference``. Returns the manifest's blob."""
    layer = write_layer(root, blobs, epoch=epoch, clamp_from=clamp_from)
    manifest = write_image(blobs, [layer], config, created=epoch)
    write_archive(path, blobs, {reference: manifest})
    return manifest
