"""A cube's configuration from what people type: firewall rules in the cube's
rule language (`drop tcp dport 22`), or a YAML/JSON config file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from pcn_crds import FUNCTION_TYPES, own_config
from pcn_crds.rules import RuleError, parse_rule

from .errors import InputError

# Function types whose rules can be typed with --rule.
RULE_TYPES = ("firewall",)


def check_type(type_: str) -> str:
    if type_ not in FUNCTION_TYPES:
        raise InputError(f"unknown function type {type_!r}; known types: "
                         f"{', '.join(sorted(FUNCTION_TYPES))}")
    return type_


def caret(text: str, column: int) -> str:
    """The text, and a caret under its (1-based) column, both indented."""
    return f"    {text}\n    {' ' * max(column - 1, 0)}^"


def _ports(rng: tuple[int, int] | None) -> str | None:
    if rng is None:
        return None
    return str(rng[0]) if rng[0] == rng[1] else f"{rng[0]}-{rng[1]}"


def rule_from_text(text: str) -> dict[str, Any]:
    """One rule as the NetworkFunction's spec.config.rules item. An invalid
    rule raises InputError that shows the rule and a caret under the mistake."""
    try:
        r = parse_rule(text)
    except RuleError as exc:
        raise InputError(f"invalid rule at column {exc.column}: {exc.message}\n"
                         f"{caret(text, exc.column)}") from None
    out = {"action": r.action, "protocol": r.proto, "source": r.src, "destination": r.dst,
           "sourcePorts": _ports(r.sport), "destinationPorts": _ports(r.dport)}
    return {k: v for k, v in out.items() if v is not None}


def rule_to_text(rule: Mapping[str, Any]) -> str:
    from pcn_crds import FirewallRule

    return FirewallRule.model_validate(dict(rule)).to_text()


def validation_message(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for e in exc.errors()[:limit]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def normalise(type_: str, config: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """The config checked against the type's model, in its stored form."""
    try:
        # own_config: an object a real API server stored carries every type's
        # schema defaults (pcn_crds.networkfunction.own_config)
        model = FUNCTION_TYPES[type_].model_validate(own_config(type_, dict(config)))
    except ValidationError as exc:
        raise InputError(f"{origin}: invalid {type_} config: {validation_message(exc)}") from None
    return model.model_dump(exclude_none=True)


def load_config_file(text: str, type_: str, origin: str) -> dict[str, Any]:
    """A config file holds the config itself, or a whole NetworkFunction whose
    spec.config is taken (so a file from `--dry-run=client -o yaml` works)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{origin}: not valid YAML or JSON: {exc}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise InputError(f"{origin}: expected a mapping like {{rules: [...], defaultAction: "
                         f"allow}}, got {type(doc).__name__}")
    if "spec" in doc:
        spec = doc.get("spec") or {}
        if spec.get("type") not in (None, type_):
            raise InputError(f"{origin}: holds a {spec.get('type')} function, not {type_}")
        doc = spec.get("config") or {}
    return normalise(type_, doc, origin)


def config_from_flags(type_: str, existing: Mapping[str, Any] | None,
                      config_file: tuple[str, str] | None, rules: Sequence[str],
                      default: str | None) -> dict[str, Any]:
    """The config to write: a file replaces it whole; --rule replaces the rules
    and --default the default action, keeping the rest; with none of them an
    existing function keeps its config (so re-running only re-places it)."""
    if config_file is not None and (rules or default):
        raise InputError("give either --config FILE or --rule/--default, not both")
    if rules and type_ not in RULE_TYPES:
        raise InputError(f"--rule applies to {', '.join(RULE_TYPES)} functions; give the "
                         f"{type_} config with --config FILE")
    if config_file is not None:
        origin, text = config_file
        return load_config_file(text, type_, origin)
    config = dict(existing or {})
    if rules:
        config["rules"] = [rule_from_text(r) for r in rules]
    if default:
        config["defaultAction"] = default
    return normalise(type_, config, "--rule/--default" if rules or default else "config")
