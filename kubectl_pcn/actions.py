"""add-cube and remove-cube: read what is there, decide (chains.py), write
the NetworkFunction and the CubeChain, or with dry_run only say what would be
written. Writes are idempotent: an object that would not change is not
written."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pcn_crds import FUNCTION_TYPES
from pcn_crds.networkfunction import TYPE_PATTERN

from . import chains as ch
from . import objects
from .client import CUBE_CHAINS, CUBE_TYPES, NETWORK_FUNCTIONS, Cluster, Resource
from .errors import Conflict, InputError, PcnError
from .rules import capture_hint, check_type, config_from_flags, custom_config, own_options

ATTEMPTS = 3  # read-modify-write of a chain, when someone else writes it meanwhile
BOTH = "both"  # --hook both: the function on both sides of the chain
# A built-in type's side when add-cube gets no --hook (else ingress): a
# capture point sees both directions
DEFAULT_HOOKS = {"packetcapture": BOTH}


@dataclass
class Change:
    kind: str
    namespace: str
    name: str
    action: str  # created, configured, unchanged, deleted, absent
    obj: dict[str, Any] | None = None  # as written (or as it would be written)
    note: str = ""

    @property
    def ref(self) -> str:
        return f"{self.kind.lower()}.pcn.dev/{self.name}"


def _write(cluster: Cluster, res: Resource, desired: dict[str, Any],
           existing: Mapping[str, Any] | None, dry_run: bool) -> Change:
    meta = desired["metadata"]
    change = Change(res.kind, meta["namespace"], meta["name"], "unchanged",
                    objects.clean(desired))
    if objects.same(desired, existing):
        change.obj = objects.clean(dict(existing or desired), res.kind)
        return change
    if existing is None:
        change.action = "created"
        if not dry_run:
            change.obj = cluster.create(res, desired)
        return change
    change.action = "configured"
    if not dry_run:
        change.obj = cluster.patch(res, meta["namespace"], meta["name"],
                                   objects.update_patch(existing, desired))
    return change


def add_cube(cluster: Cluster, *, namespace: str, type_: str, name: str,
             selector: dict[str, Any] | None, hook: str, placement: ch.Placement,
             config_file: tuple[str, str] | None, rules: Sequence[str], default: str | None,
             chain_name: str | None, priority: int | None, dry_run: bool,
             progress: Callable[[str], None], fields: Mapping[str, Any] | None = None,
             params: Sequence[str] = (),
             warn: Callable[[str], None] = lambda _: None) -> list[Change]:
    """`fields`: the config field options given (flag -> value, rules.field_options);
    `params`: NAME=VALUE parameters of a CubeType (TYPE names one that is not
    built in); `hook` "" takes the CubeType's defaultHook (built-in: ingress).
    `warn` is told when that CubeType is not Ready (cubetype_not_ready): the
    function is still written, as `kubectl apply` of it would be."""
    cubetype = find_cubetype(cluster, type_, progress)
    if cubetype is not None and (why := cubetype_not_ready(cubetype)) is not None:
        warn(why)
    if cubetype is None:
        check_type(type_)
        if params:
            raise InputError(f"--param applies to CubeTypes; {own_options(type_)}")
        config_from_flags(type_, None, config_file, rules, default, fields)  # input errors first
    else:
        if rules or default or fields:
            raise InputError(f"{type_} is a CubeType: give its parameters with --param "
                             f"NAME=VALUE (`kubectl pcn add-cube {type_} --help`)")
        custom_config(cubetype, None, config_file, params, check=False)  # input errors first
    hook = hook or ((cubetype or {}).get("spec") or {}).get("defaultHook") or \
        DEFAULT_HOOKS.get(type_, "ingress")
    hooks = ch.SIDES if hook == BOTH else (hook,)
    progress(f"reading networkfunction {namespace}/{name}")
    existing_nf = cluster.get(NETWORK_FUNCTIONS, namespace, name)
    existing_config = None
    if existing_nf is not None:
        have_type = (existing_nf.get("spec") or {}).get("type")
        if have_type != type_:
            raise PcnError(f"networkfunction {namespace}/{name} exists with type {have_type}, "
                           f"not {type_}", "choose another NAME, or remove-cube it first")
        existing_config = (existing_nf.get("spec") or {}).get("config") or {}
    config = config_from_flags(type_, existing_config, config_file, rules, default, fields) \
        if cubetype is None else custom_config(cubetype, existing_config, config_file, params)
    desired_nf = objects.network_function(namespace, name, type_, config, existing_nf)

    nf_change: Change | None = None
    for attempt in range(ATTEMPTS):
        progress(f"reading cubechains of namespace {namespace}")
        chains = cluster.list(CUBE_CHAINS, namespace)
        choice = ch.choose_chain(chains, selector, chain_name, priority)
        if choice.existing is not None:
            objects.existing_model(choice.existing, "CubeChain")
        sides = {s: ch.side_of(choice.existing or {}, s) for s in ch.SIDES}
        for h in hooks:
            sides[h] = ch.place(sides[h], name, placement, h)
        desired_chain = objects.cube_chain(namespace, choice.name, choice.selector,
                                           sides["ingress"], sides["egress"], choice.priority,
                                           choice.existing)
        if nf_change is None:  # the function first: a chain never names a missing one
            nf_change = _write(cluster, NETWORK_FUNCTIONS, desired_nf, existing_nf, dry_run)
        try:
            chain_change = _write(cluster, CUBE_CHAINS, desired_chain, choice.existing, dry_run)
        except Conflict:
            if attempt + 1 == ATTEMPTS:
                raise
            progress(f"cubechain {choice.name} changed meanwhile; trying again")
            continue
        chain_change.note = "; ".join(
            f"{h}: {' -> '.join(sides[h])} ({name} at position {sides[h].index(name) + 1} "
            f"of {len(sides[h])})" for h in hooks) + \
            f" (selects {ch.format_selector(choice.selector)})"
        return [nf_change, chain_change]
    raise AssertionError("unreachable")  # pragma: no cover


def find_cubetype(cluster: Cluster, type_: str, progress: Callable[[str], None]
                  ) -> dict[str, Any] | None:
    """The CubeType `type_` names, None for a built-in type; InputError when
    it is neither."""
    if type_ in FUNCTION_TYPES:
        return None
    if not re.match(TYPE_PATTERN, type_):  # no CubeType can have that name: ask no cluster
        raise InputError(f"unknown function type {type_!r}; built-in types: "
                         f"{', '.join(sorted(FUNCTION_TYPES))}, or a CubeType's name "
                         "(lower-case letters, digits and dashes)" + capture_hint(type_))
    progress(f"reading cubetype {type_}")
    found = cluster.get(CUBE_TYPES, None, type_)
    if found is None:
        names = sorted(o["metadata"]["name"] for o in cluster.list(CUBE_TYPES, None))
        raise InputError(f"unknown function type {type_!r}; built-in types: "
                         f"{', '.join(sorted(FUNCTION_TYPES))}; CubeTypes of the cluster: "
                         f"{', '.join(names) or 'none'}" + capture_hint(type_))
    return found


def cubetype_not_ready(cubetype: Mapping[str, Any]) -> str | None:
    """None when the CubeType's Ready condition is True (for its current
    generation); else why not, from its status: the condition's reason and
    message and the nodes that failed (status.nodes, each node's agent's
    own entry), or that no agent has reported on it yet."""
    name = (cubetype.get("metadata") or {}).get("name")
    generation = (cubetype.get("metadata") or {}).get("generation")
    status = cubetype.get("status") or {}
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    after = ("; the function is written, and its cubes are made once the CubeType compiles "
             "(`kubectl get cubetype " + f"{name} -o yaml` shows each node's errors)")
    if cond is None:
        return f"cubetype {name} is not Ready: no agent has compiled it yet{after}"
    stale = generation is not None and cond.get("observedGeneration") not in (None, generation)
    if cond.get("status") == "True" and not stale:
        return None
    if cond.get("status") == "True":
        return (f"cubetype {name} is not Ready: generation {generation} is not compiled yet "
                f"(the agents last compiled {cond.get('observedGeneration')}){after}")
    nodes = status.get("nodes") or {}
    failing = sorted(n for n, st in nodes.items() if not (st or {}).get("ready"))
    where = f" on node(s) {', '.join(failing)}" if failing else ""
    return (f"cubetype {name} is not Ready{where}: {cond.get('reason') or 'NotReady'}: "
            f"{cond.get('message') or 'no message'}{after}")


def remove_cube(cluster: Cluster, *, namespace: str, name: str, dry_run: bool,
                progress: Callable[[str], None]) -> list[Change]:
    """Take the function out of every chain of its namespace (deleting chains
    this plugin created that end up empty), then delete it."""
    progress(f"reading cubechains of namespace {namespace}")
    changes: list[Change] = []
    for chain in cluster.list(CUBE_CHAINS, namespace):
        sides = {s: ch.side_of(chain, s) for s in ch.SIDES}
        if not any(name in v for v in sides.values()):
            continue
        cname = ch.name_of(chain)
        rest = {s: ch.without(v, name) for s, v in sides.items()}
        labels = (chain.get("metadata") or {}).get("labels") or {}
        ours = labels.get(objects.MANAGED_BY[0]) == objects.MANAGED_BY[1]
        if ours and not rest["ingress"] and not rest["egress"]:
            if not dry_run:
                cluster.delete(CUBE_CHAINS, namespace, cname)
            changes.append(Change("CubeChain", namespace, cname, "deleted",
                                  note="it held only this function"))
            continue
        patch = {"spec": {s: [{"function": f} for f in v] for s, v in rest.items()
                          if v != sides[s]}}
        rv = (chain.get("metadata") or {}).get("resourceVersion")
        if rv:
            patch["metadata"] = {"resourceVersion": rv}
        obj = objects.clean({**chain, "spec": {**(chain.get("spec") or {}),
                                               **patch["spec"]}}, "CubeChain")
        if not dry_run:
            obj = cluster.patch(CUBE_CHAINS, namespace, cname, patch)
        changes.append(Change("CubeChain", namespace, cname, "configured", obj,
                              note=f"removed {name}"))
    progress(f"deleting networkfunction {namespace}/{name}")
    if dry_run:
        gone = cluster.get(NETWORK_FUNCTIONS, namespace, name) is not None
    else:
        gone = cluster.delete(NETWORK_FUNCTIONS, namespace, name)
    changes.append(Change("NetworkFunction", namespace, name, "deleted" if gone else "absent"))
    return changes
