"""Object merging as the Kubernetes API and kubectl do it, on plain JSON
values: JSON merge patches (RFC 7386) and `kubectl apply`'s three-way merge.

The emulated API server (kmock) understands merge patches only, so the lab
computes what kubectl would have the server compute (a strategic merge of
lists by their merge keys, for built-in kinds) on the client side and sends
the result as a merge patch.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

# The strategic-merge-patch keys of the built-in list fields a user's YAML
# holds (k8s.io/api `patchMergeKey`): such lists merge element by element,
# so what the server or a controller added to an element (a Service port's
# nodePort, say) survives a re-apply. Lists of other fields, and every list
# of a custom resource, are atomic: the applied list replaces the old one.
MERGE_KEYS: dict[str, str] = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "volumes": "name", "env": "name", "imagePullSecrets": "name",
    "volumeMounts": "mountPath", "volumeDevices": "devicePath",
    "hostAliases": "ip", "ownerReferences": "uid",
}

# Lists of scalars that a strategic merge patch merges (patchStrategy merge):
# the patch's values are added to the live ones.
MERGED_SCALAR_LISTS = {"finalizers"}

_MISSING = object()


def merge_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `current` into `desired`:
    keys gone from `desired` map to None, changed maps recurse, any other
    changed value (lists included) is given whole. {} when they are equal.
    `desired` must hold no None values (RFC 7386 cannot express them)."""
    patch: dict[str, Any] = {}
    for key in current:
        if key not in desired:
            patch[key] = None
    for key, want in desired.items():
        have = current.get(key, _MISSING)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = merge_patch(have, want)
            if sub:
                patch[key] = sub
        elif have is _MISSING or have != want:
            patch[key] = copy.deepcopy(want)
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 MergePatch(target, patch): a new value, the inputs untouched."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


def three_way_merge(original: Mapping[str, Any], modified: Mapping[str, Any],
                    current: Mapping[str, Any], strategic: bool) -> dict[str, Any]:
    """What `kubectl apply` makes of an object: `current` (the live object)
    with what the user's configuration changed since the last apply.

    `original` is the configuration applied last time (the
    last-applied-configuration annotation; {} when there is none),
    `modified` the one applied now. A field in `original` but not in
    `modified` is removed, a field in `modified` is set, a field in neither
    (set by the server or a controller) is kept. Maps merge recursively. With
    `strategic` (kubectl's strategic merge for built-in kinds) the lists named
    in MERGE_KEYS, and `ports` (by containerPort, or by port for a Service),
    merge element by element on their key; any other list is replaced whole.
    None in `modified` removes the field, as in kubectl. Returns a new object."""
    out: dict[str, Any] = {k: copy.deepcopy(v) for k, v in current.items()}
    for key in original:
        if key not in modified:
            out.pop(key, None)
    for key, want in modified.items():
        have = current.get(key, _MISSING)
        before = original.get(key)
        if want is None:
            out.pop(key, None)
        elif isinstance(want, Mapping) and isinstance(have, Mapping):
            out[key] = three_way_merge(before if isinstance(before, Mapping) else {}, want,
                                       have, strategic)
        elif strategic and isinstance(want, list) and isinstance(have, list) \
                and (merge_key := _merge_key(key, want, have)) is not None:
            out[key] = _merge_list(before if isinstance(before, list) else [], want, have,
                                   merge_key)
        elif strategic and key in MERGED_SCALAR_LISTS and isinstance(want, list) \
                and isinstance(have, list):
            dropped = [v for v in (before if isinstance(before, list) else []) if v not in want]
            out[key] = [v for v in have if v not in dropped] + [v for v in want if v not in have]
        else:
            out[key] = copy.deepcopy(want)
    return out


def _merge_key(field: str, *lists: list[Any]) -> str | None:
    if field == "ports":  # a container's ports, or a Service's
        elems = [e for lst in lists for e in lst if isinstance(e, Mapping)]
        return "containerPort" if any("containerPort" in e for e in elems) else "port"
    return MERGE_KEYS.get(field)


def _merge_list(original: list[Any], modified: list[Any], current: list[Any],
                key: str) -> list[Any]:
    """A strategic merge of one list: the elements of `modified` in its
    order, each merged into the live element with the same key; then the
    live elements nobody applied (added by others), in their order."""
    def k(e: Any) -> Any:
        return e.get(key, _MISSING) if isinstance(e, Mapping) else _MISSING

    live = {k(e): e for e in current if k(e) is not _MISSING}
    before = {k(e): e for e in original if k(e) is not _MISSING}
    applied = {k(e) for e in modified}
    out = []
    for want in modified:
        have = live.get(k(want))
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            prev = before.get(k(want))
            out.append(three_way_merge(prev if isinstance(prev, Mapping) else {}, want, have,
                                       True))
        else:
            out.append(copy.deepcopy(want))
    for have in current:
        if k(have) is _MISSING or (k(have) not in applied and k(have) not in before):
            out.append(copy.deepcopy(have))
    return out


def apply_strategic_patch(target: Mapping[str, Any], patch: Mapping[str, Any]
                          ) -> dict[str, Any]:
    """A strategic merge patch (what kubectl apply, edit, label and patch
    send for built-in kinds) applied to `target`, as the API server's
    strategicpatch.StrategicMergePatch does: maps merge recursively and None
    deletes a key; a list with a merge key (MERGE_KEYS, `ports`) merges
    element by element, an element {"$patch": "delete", key: ...} removes
    one, "$setElementOrder/<list>" orders it; a list of scalars in
    MERGED_SCALAR_LISTS gains the patch's values and "$deleteFromPrimitiveList/
    <list>" removes values from one; {"$patch": "replace"}
    replaces a map, {"$patch": "delete"} removes it, "$retainKeys" keeps only
    the keys it names; any other list is replaced. Returns a new object."""
    out = _strategic_map(target, patch)
    return out if out is not None else {}


def _strategic_map(target: Any, patch: Mapping[str, Any]) -> dict[str, Any] | None:
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    body = {k: v for k, v in patch.items() if not k.startswith("$")}
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in body.items() if v is not None}
    out = {k: copy.deepcopy(v) for k, v in target.items()} if isinstance(target, Mapping) else {}
    if "$retainKeys" in patch:
        keep = set(patch["$retainKeys"] or [])
        out = {k: v for k, v in out.items() if k in keep}
    for key, value in body.items():
        have = out.get(key)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping):
            merged = _strategic_map(have, value)
            if merged is None:
                out.pop(key, None)
            else:
                out[key] = merged
        elif isinstance(value, list) and isinstance(have, list) \
                and (merge_key := _merge_key(key, value, have)) is not None:
            out[key] = _strategic_list(have, value, merge_key)
        elif key in MERGED_SCALAR_LISTS and isinstance(value, list) and isinstance(have, list):
            out[key] = have + [v for v in value if v not in have]
        else:
            out[key] = copy.deepcopy(value)
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            gone = list(value or [])
            out[field] = [v for v in out.get(field) or [] if v not in gone]
        elif key.startswith("$setElementOrder/"):
            field = key.split("/", 1)[1]
            out[field] = _ordered(out.get(field) or [], list(value or []), field)
    return out


def _strategic_list(have: list[Any], patch: list[Any], key: str) -> list[Any]:
    out = [copy.deepcopy(e) for e in have]
    for item in patch:
        if not isinstance(item, Mapping) or key not in item:
            out.append(copy.deepcopy(item))
            continue
        at = next((i for i, e in enumerate(out)
                   if isinstance(e, Mapping) and e.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del out[at]
        elif at is None:
            out.append({k: copy.deepcopy(v) for k, v in item.items() if not k.startswith("$")})
        else:
            merged = _strategic_map(out[at], item)
            if merged is None:
                del out[at]
            else:
                out[at] = merged
    return out


def _ordered(items: list[Any], order: list[Any], field: str) -> list[Any]:
    """`items` in the order of `order` (elements, or {key: value} stubs of
    them); the rest after, in their order."""
    key = _merge_key(field, items, order)

    def ident(e: Any) -> Any:
        return e.get(key) if key is not None and isinstance(e, Mapping) else _json_key(e)

    rank = {ident(e): i for i, e in enumerate(order)}
    return sorted(items, key=lambda e: rank.get(ident(e), len(rank)))


def _json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
