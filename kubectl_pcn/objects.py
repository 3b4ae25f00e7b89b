"""The pcn objects the plugin writes: built complete (apply-able as they
are), compared semantically, and turned into minimal merge patches."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from pcn_crds import GROUP, VERSION, CubeChain, NetworkFunction

from .chains import canonical_selector
from .errors import InputError, PcnError
from .rules import validation_message

API_VERSION = f"{GROUP}/{VERSION}"
MANAGED_BY = ("app.kubernetes.io/managed-by", "kubectl-pcn")
# Metadata a server sets; none of it belongs in a manifest kept in git.
SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields",
                 "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds")
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _metadata(namespace: str, name: str, existing: Mapping[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    old = (existing or {}).get("metadata") or {}
    labels = dict(old.get("labels") or {})
    if existing is None:
        labels[MANAGED_BY[0]] = MANAGED_BY[1]
    if labels:
        meta["labels"] = labels
    annotations = {k: v for k, v in (old.get("annotations") or {}).items() if k != LAST_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    return meta


def network_function(namespace: str, name: str, type_: str, config: Mapping[str, Any],
                     existing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    obj = {"apiVersion": API_VERSION, "kind": "NetworkFunction",
           "metadata": _metadata(namespace, name, existing),
           "spec": {"type": type_, "config": dict(config)}}
    check(obj)
    return obj


def cube_chain(namespace: str, name: str, selector: Mapping[str, Any], ingress: Sequence[str],
               egress: Sequence[str], priority: int,
               existing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": canonical_selector(selector),
                            "ingress": [{"function": f} for f in ingress],
                            "egress": [{"function": f} for f in egress],
                            "priority": priority}
    obj = {"apiVersion": API_VERSION, "kind": "CubeChain",
           "metadata": _metadata(namespace, name, existing), "spec": spec}
    check(obj)
    return obj


def check(obj: Mapping[str, Any]) -> None:
    """Validate against the pcn.dev models before anything is written."""
    model = NetworkFunction if obj.get("kind") == "NetworkFunction" else CubeChain
    try:
        model.model_validate(dict(obj))
    except ValidationError as exc:
        meta = obj.get("metadata") or {}
        raise InputError(f"{str(obj.get('kind')).lower()} {meta.get('namespace')}/"
                         f"{meta.get('name')} would be invalid: {validation_message(exc)}"
                         ) from None


def normalised_spec(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The spec as the agent understands it (defaults filled in), to compare
    two objects by meaning rather than by spelling."""
    if obj is None:
        return None
    model = NetworkFunction if kind == "NetworkFunction" else CubeChain
    try:
        return model.model_validate({**obj, "apiVersion": API_VERSION, "kind": kind,
                                     "status": None}).spec.model_dump(exclude_none=True)
    except ValidationError:
        return dict(obj.get("spec") or {})


def same(desired: Mapping[str, Any], existing: Mapping[str, Any] | None) -> bool:
    if existing is None:
        return False
    want_labels = (desired.get("metadata") or {}).get("labels") or {}
    have_labels = (existing.get("metadata") or {}).get("labels") or {}
    kind = str(desired.get("kind"))
    return normalised_spec(desired, kind) == normalised_spec(existing, kind) and \
        want_labels == have_labels


def existing_model(obj: Mapping[str, Any], kind: str) -> None:
    """Refuse to edit an object the agent already rejects: say why instead."""
    model = NetworkFunction if kind == "NetworkFunction" else CubeChain
    try:
        model.model_validate({**obj, "apiVersion": API_VERSION, "kind": kind, "status": None})
    except ValidationError as exc:
        meta = obj.get("metadata") or {}
        raise PcnError(f"{kind.lower()} {meta.get('namespace')}/{meta.get('name')} in the "
                       f"cluster is invalid ({validation_message(exc)})",
                       "fix it with kubectl edit, or delete it") from None


def clean(obj: Mapping[str, Any], kind: str | None = None) -> dict[str, Any]:
    """An object as a manifest: apiVersion, kind, metadata without what the
    server sets, spec; no status. (Lists from the API lack kind and
    apiVersion on some servers, hence `kind`.)"""
    out = copy.deepcopy(dict(obj))
    out.pop("status", None)
    if kind is not None:
        out.setdefault("apiVersion", API_VERSION)
        out.setdefault("kind", kind)
    meta = out.get("metadata") or {}
    for f in SERVER_FIELDS:
        meta.pop(f, None)
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    ordered: dict[str, Any] = {k: out.pop(k) for k in ("apiVersion", "kind", "metadata")
                               if k in out}
    return {**ordered, **out}


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`; {} when
    they are equal. Lists are replaced whole, removed keys are set to null."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            if isinstance(old[key], Mapping) and isinstance(value, Mapping):
                patch[key] = merge_patch(old[key], value)
            else:
                patch[key] = copy.deepcopy(value)
    return patch


def update_patch(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The patch that writes desired's spec and labels over existing, guarded
    by existing's resourceVersion when the server gave one."""
    patch: dict[str, Any] = {}
    spec = merge_patch(existing.get("spec") or {}, desired.get("spec") or {})
    if spec:
        patch["spec"] = spec
    old_labels = (existing.get("metadata") or {}).get("labels") or {}
    new_labels = (desired.get("metadata") or {}).get("labels") or {}
    labels = merge_patch(old_labels, new_labels)
    meta: dict[str, Any] = {}
    if labels:
        meta["labels"] = labels
    rv = (existing.get("metadata") or {}).get("resourceVersion")
    if patch or meta:
        if rv:
            meta["resourceVersion"] = rv
        if meta:
            patch["metadata"] = meta
    return patch
