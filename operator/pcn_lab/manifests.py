"""What `pcn-lab up -f PATH` and `pcn-lab apply -f PATH` apply, the same for
the emulated lab and the real cluster (`up --kubernetes`): a file; a folder
holding kustomization.yaml as a kustomization; any other folder as its
YAML/JSON files and, recursively, its subfolders by the same rules. So
`-f examples/` applies examples/app.yaml, the kustomization examples/argocd
and examples/cubetypes/*.yaml on both (the real cluster once skipped
cubetypes/, a folder without a kustomization).

The real cluster applies each target with `kubectl apply -f FILE` or
`kubectl apply -k DIR`; the emulated lab, which has no kustomize, reads the
files those targets hold (manifest_files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

KUSTOMIZATIONS = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUFFIXES = (".yaml", ".yml", ".json")


def _kustomization(folder: Path) -> bool:
    return any((folder / k).is_file() for k in KUSTOMIZATIONS)


def manifest_targets(path: Path) -> list[tuple[str, Path]]:
    """(kubectl apply's flag, path) pairs in order: ("-f", FILE) or ("-k",
    FOLDER). A folder's own files come before its subfolders, each sorted by
    name; hidden files and folders are skipped. FileNotFoundError when `path`
    does not exist."""
    if path.is_file():
        return [("-f", path)]
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder {path}")
    if _kustomization(path):
        return [("-k", path)]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    out: list[tuple[str, Path]] = [("-f", p) for p in entries
                                   if p.is_file() and p.suffix in SUFFIXES]
    for sub in (p for p in entries if p.is_dir()):
        out += manifest_targets(sub)
    return out


def manifest_files(path: Path) -> list[Path]:
    """The files of manifest_targets(path): each -f file, and the YAML/JSON
    files under each -k folder but its kustomization file (the emulated lab
    applies a kustomization's resources as they are, without its
    transformations)."""
    files: list[Path] = []
    for flag, target in manifest_targets(path):
        if flag == "-f":
            files.append(target)
            continue
        files += sorted(p for p in target.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                        and p.name not in KUSTOMIZATIONS
                        and not any(part.startswith(".") for part in p.relative_to(target).parts))
    return files


def cluster_scoped(kind: Any) -> bool:
    """Whether objects of `kind` have no namespace, as far as the lab's
    emulated API server knows the kind (CubeType, NodePortRule, Node)."""
    from pcn_lab.apiserver import PLURALS, RESOURCES

    return kind in PLURALS and not RESOURCES[PLURALS[kind]]["namespaced"]


def workload_namespace(docs: list[dict[str, Any]]) -> str | None:
    """The one namespace all the namespaced objects of `docs` are in (an
    object without one is in "default"); None when they are in several, or
    there are none. (Namespaces and the lab's cluster-wide kinds do not count.)"""
    from pcn_lab.apiserver import PLURALS, RESOURCES

    names = {(d.get("metadata") or {}).get("namespace") or "default" for d in docs
             if d.get("kind") in PLURALS and RESOURCES[PLURALS[d["kind"]]]["namespaced"]}
    return names.pop() if len(names) == 1 else None
