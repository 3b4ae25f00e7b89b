"""A cube's configuration from what people type: firewall rules in the cube's
rule language (`drop tcp dport 22`), an option per config field of the other
types (`--rate 10M`), or a YAML/JSON config file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import ValidationError

from pcn_crds import FUNCTION_TYPES
from pcn_crds.cubetype import Param, SchemaError, config_errors, param_layout
from pcn_crds.rules import RuleError, parse_rule

from .errors import InputError

# Function types whose rules can be typed with --rule.
RULE_TYPES = ("firewall",)
# Config fields that have options of their own; every other field of a
# type's model is an option named after it (FieldOption).
SPECIAL_FIELDS = {("firewall", "rules"): "rule", ("firewall", "defaultAction"): "default"}


@dataclass(frozen=True)
class FieldOption:
    """An add-cube option that sets one field of a type's spec.config:
    `--flag VALUE`, its help the field's description, its choices the
    field's Literal values (None: any text, checked by the model)."""

    type_: str
    field: str
    flag: str  # without the leading dashes
    help: str
    choices: tuple[str, ...] | None
    boolean: bool = False  # a bool field: --flag / --no-flag

    @property
    def param(self) -> str:
        """The click parameter name (prefixed: a field may share a name with
        a global option)."""
        return "cfg_" + self.flag.replace("-", "_")


def _kebab(name: str) -> str:
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name)


def _boolean(annotation: Any) -> bool:
    """Whether an annotation is bool or bool | None."""
    return annotation is bool or (bool in get_args(annotation)
                                  and set(get_args(annotation)) <= {bool, type(None)})


def _choices(annotation: Any) -> tuple[str, ...] | None:
    """The values of a Literal (or Literal | None) annotation."""
    if get_origin(annotation) is Literal:
        return tuple(str(a) for a in get_args(annotation))
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return tuple(str(a) for a in get_args(arg))
    return None


def field_options() -> list[FieldOption]:
    """One option per config field of every type, but the SPECIAL_FIELDS, in
    the models' order."""
    out = []
    for type_, model in FUNCTION_TYPES.items():
        for name, info in model.model_fields.items():
            if (type_, name) in SPECIAL_FIELDS:
                continue
            out.append(FieldOption(type_, name, _kebab(name), info.description or "",
                                   _choices(info.annotation), _boolean(info.annotation)))
    return out


def options_of(type_: str) -> set[str]:
    """The flags (without dashes) that set a config field of `type_`."""
    return {f for (t, _), f in SPECIAL_FIELDS.items() if t == type_} | \
        {o.flag for o in field_options() if o.type_ == type_}


def own_options(type_: str) -> str:
    """What a built-in type's config is given with, for a message about an
    option of another type: "a policer takes --rate, --burst, --scope, or
    --config FILE (`kubectl pcn add-cube policer --help`)"."""
    special = [f for (t, _), f in SPECIAL_FIELDS.items() if t == type_]
    flags = special + [o.flag for o in field_options() if o.type_ == type_]
    listed = "".join(f"--{f}, " for f in flags)
    return (f"a {type_} takes {listed}or --config FILE "
            f"(`kubectl pcn add-cube {type_} --help`)")


def cubetype_params(cubetype: Mapping[str, Any]) -> tuple[Param, ...]:
    """The parameters of a CubeType object (InputError when its schema is
    outside the restriction: its status says so too)."""
    try:
        return param_layout(((cubetype.get("spec") or {}).get("parameters")) or {})
    except SchemaError as exc:
        name = (cubetype.get("metadata") or {}).get("name")
        raise InputError(f"cubetype {name}: its parameters cannot be used: {exc}") from None


def param_value(p: Param, text: str) -> Any:
    """A --param value as the parameter's JSON type: integers and booleans
    parsed, strings kept (config_errors then checks ranges and values)."""
    if p.kind == "integer":
        try:
            return int(text, 0)
        except ValueError:
            raise InputError(f"--param {p.name}={text}: not an integer") from None
    if p.kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise InputError(f"--param {p.name}={text}: true or false")
        return text.lower() == "true"
    return text


def custom_config(cubetype: Mapping[str, Any], existing: Mapping[str, Any] | None,
                  config_file: tuple[str, str] | None, params: Sequence[str],
                  check: bool = True) -> dict[str, Any]:
    """The config of a function of a CubeType: a --config file replaces it
    whole (the config, or a NetworkFunction whose spec.config is taken);
    each --param NAME=VALUE sets one parameter, keeping the rest. Checked
    against the type's schema as the agents check it (the same library and
    messages, naming the field; `check` False: the options' own errors
    only, before the existing config is read); InputError otherwise."""
    layout = cubetype_params(cubetype)
    name = (cubetype.get("metadata") or {}).get("name") or ""
    if config_file is not None and params:
        raise InputError("give either --config FILE or --param options, not both")
    if config_file is not None:
        origin, text = config_file
        try:
            doc = load_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{origin}: not valid YAML or JSON: {exc}") from None
        if not isinstance(doc, Mapping):
            raise InputError(f"{origin}: expected a mapping of parameters")
        if "spec" in doc:
            doc = (doc.get("spec") or {}).get("config") or {}
        config = dict(doc)
    else:
        config = dict(existing or {})
        by_name = {p.name: p for p in layout}
        for item in params:
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"--param {item}: give NAME=VALUE")
            if key not in by_name:
                raise InputError(f"--param {key}: not a parameter of {name}; it takes "
                                 f"{', '.join(by_name) or 'none'} (`kubectl pcn add-cube "
                                 f"{name} --help`)")
            config[key] = param_value(by_name[key], value)
    errors = config_errors(layout, config) if check else []
    if errors:
        raise InputError(f"invalid {name} config: {'; '.join(errors)}")
    return config


# Types a user may mean when asking for a capture (`kubectl pcn capture` is a
# verb of its own): their error points there
_CAPTURE_WORDS = ("capture", "pcap", "sniff", "tcpdump", "wireshark")
def capture_hint(type_: str) -> str:
    """For a type name close to "capture" (capture, pcap, sniff...): where
    captures are ("" for other names)."""
    import difflib

    low = type_.lower()
    if any(w in low for w in _CAPTURE_WORDS) or difflib.get_close_matches(
            low, ("capture", "packetcapture"), n=1, cutoff=0.75):
        return ("; to capture a pod's packets now, run `kubectl pcn capture POD`; to keep a "
                "capture point in the chain, add-cube packetcapture")
    return ""


def check_type(type_: str) -> str:
    if type_ not in FUNCTION_TYPES:
        raise InputError(f"unknown function type {type_!r}; known types: "
                         f"{', '.join(sorted(FUNCTION_TYPES))}" + capture_hint(type_))
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
        model = FUNCTION_TYPES[type_].model_validate(dict(config))
    except ValidationError as exc:
        raise InputError(f"{origin}: invalid {type_} config: {validation_message(exc)}") from None
    return model.model_dump(exclude_none=True)


# libyaml's loader when PyYAML was built with it: a 10 000-rule file took
# 14.6 s with the pure-Python SafeLoader (trial of issue 12). Same documents,
# same safe tags.
_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    """One YAML (or JSON) document as yaml.safe_load reads it, with libyaml
    when available; yaml.YAMLError when it does not parse."""
    return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)


RULE_FORMS = ("a rule is a string in --rule's grammar ('drop tcp dport 22') or a mapping "
              "({action: drop, protocol: tcp, destinationPorts: '22'})")


def _file_rules(rules: Any, origin: str) -> Any:
    """A firewall file's rules with each string item parsed by the --rule
    grammar (rule_from_text) into the mapping form; an item that is neither
    is an InputError naming both forms. Anything but a list is left to the
    model to refuse."""
    if not isinstance(rules, list):
        return rules
    out: list[Any] = []
    for i, item in enumerate(rules):
        if isinstance(item, str):
            try:
                out.append(rule_from_text(item))
            except InputError as exc:
                raise InputError(f"{origin}: rules.{i}: {exc.message}") from None
        elif isinstance(item, Mapping):
            out.append(item)
        else:
            raise InputError(f"{origin}: rules.{i}: {RULE_FORMS}; got {item!r}")
    return out


def load_config_file(text: str, type_: str, origin: str) -> dict[str, Any]:
    """A config file holds the config itself, or a whole NetworkFunction whose
    spec.config is taken (so a file from `--dry-run=client -o yaml` works).
    A firewall's rules may be written as --rule takes them (`- drop tcp
    dport 22`), as mappings, or both mixed (RULE_FORMS)."""
    try:
        doc = load_yaml(text)
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
    if type_ in RULE_TYPES and isinstance(doc, Mapping) and "rules" in doc:
        doc = {**doc, "rules": _file_rules(doc["rules"], origin)}
    return normalise(type_, doc, origin)


def config_from_flags(type_: str, existing: Mapping[str, Any] | None,
                      config_file: tuple[str, str] | None, rules: Sequence[str],
                      default: str | None, fields: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """The config to write: a file replaces it whole; --rule replaces the rules
    and --default the default action, each field option (`fields`: flag ->
    value, see field_options) its field, keeping the rest; with none of them
    an existing function keeps its config (so re-running only re-places it)."""
    fields = dict(fields or {})
    if config_file is not None and (rules or default or fields):
        raise InputError("give either --config FILE or options that set fields, not both")
    if rules and type_ not in RULE_TYPES:
        raise InputError(f"--rule applies to {', '.join(RULE_TYPES)} functions, not "
                         f"{type_}; {own_options(type_)}")
    if default and type_ != "firewall":
        raise InputError(f"--default applies to firewall functions, not {type_}; "
                         f"{own_options(type_)}")
    by_flag = {o.flag: o for o in field_options()}
    for flag in fields:
        o = by_flag.get(flag)
        if o is None or o.type_ != type_:
            owner = f"{o.type_} functions" if o else "no function type"
            raise InputError(f"--{flag} applies to {owner}, not {type_}; "
                             f"{own_options(type_)}")
    if config_file is not None:
        origin, text = config_file
        return load_config_file(text, type_, origin)
    config = dict(existing or {})
    if rules:
        config["rules"] = [rule_from_text(r) for r in rules]
    if default:
        config["defaultAction"] = default
    for flag, value in fields.items():
        config[by_flag[flag].field] = value
    given = rules or default or fields
    return normalise(type_, config, "options" if given else "config")
