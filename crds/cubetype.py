"""CubeType: a custom cube a cluster admin registers (cluster-scoped; RBAC in
manifests/rbac.yaml lets nobody but admins create or change one).

spec.source is the C text of a transparent cube written against pcn's cube
API (bpf/include/pcn_cube_api.h, docs/writing-a-cube.md); every node's agent
compiles it with BCC and reports, in status.nodes, whether it compiled and
the compiler's or the verifier's errors at the lines of spec.source.
NetworkFunctions of the namespaces name it in spec.type and give its
parameters in spec.config, validated against spec.parameters.

spec.parameters is an OpenAPI v3 object schema restricted to what a BPF map
value carries (one 64-bit word per parameter, read by index):

- ``integer`` with both ``minimum`` and ``maximum`` (within -2^63..2^64-1);
- ``boolean``;
- ``string`` with ``enum`` (read as the value's index in the list) or with
  ``format: ipv4`` (read as the address in network byte order).

Each may have a ``description`` and a ``default``; the object may list
``required`` parameters. Anything else (patterns, nested objects, arrays,
other formats, anyOf...) is refused: the agents report it in status and do
not compile the type. Upstream reference: the structural schema rules of
Kubernetes' CustomResourceDefinitions (apiextensions.k8s.io/v1), of which
this is a subset.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from .common import AGE_COLUMN, READY_COLUMN, REASON_COLUMN, Model, Resource, ResourceStatus

MAX_PARAMS = 16  # PCN_CUBE_MAX_PARAMS in bpf/include/pcn_cube_api.h
MAX_COUNTERS = 16  # PCN_CUBE_MAX_COUNTERS
MAX_SOURCE = 65536  # characters of spec.source
MAX_ERRORS = 20  # errors a node lists in status
NAME_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
PARAM_NAME = re.compile(r"^[a-z][a-zA-Z0-9]{0,30}$")
ENUM_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$")
# Names a CubeType cannot take: the built-in NetworkFunction types and the
# cube types of bpf/*.c (a test keeps this list complete).
RESERVED_NAMES = frozenset({"firewall", "policer", "flowmonitor", "packetcapture", "bridge",
                            "router", "lbrp", "k8sdispatcher", "policy", "entry", "sock_lb"})


def reserved_name_message(name: str) -> str:
    """Why a CubeType cannot be called `name` (one of RESERVED_NAMES), and
    what to do: the agent's status message (reason ReservedName); the CRD's
    CEL rule (reserved_name_rule) says the same."""
    return (f"{name} is the name of a built-in cube type; rename the CubeType "
            f"(e.g. my-{name}) and the spec.type of the NetworkFunctions that use it")


def reserved_name_rule() -> dict[str, str]:
    """The CEL rule at the root of the CubeType schema that refuses a
    reserved name at the API server, with reserved_name_message's text.
    Kubernetes lets a root rule read self.metadata.name (CRD validation
    rules, "Validation rules" in the CustomResourceDefinition docs)."""
    names = ", ".join(f"'{n}'" for n in sorted(RESERVED_NAMES))
    text = reserved_name_message("NAME").split("NAME")
    assert len(text) == 3, text
    return {"rule": f"!(self.metadata.name in [{names}])",
            "messageExpression": f"self.metadata.name + '{text[1]}' + self.metadata.name + "
                                 f"'{text[2]}'",
            "reason": "FieldValueForbidden"}


INT_MIN, INT_MAX = -(2**63), 2**64 - 1
_PARAM_KEYS = {"integer": {"type", "minimum", "maximum", "default", "description"},
               "boolean": {"type", "default", "description"},
               "string": {"type", "enum", "format", "default", "description"}}
_OBJECT_KEYS = {"type", "properties", "required", "description", "additionalProperties"}
RESTRICTION = ("a parameter is an integer with minimum and maximum, a boolean, or a string "
               "with enum or format ipv4")


class CubeTypeSpec(Model):
    source: str = Field(max_length=MAX_SOURCE, description=(
        "C source of a transparent cube written against pcn's cube API "
        "(bpf/include/pcn_cube_api.h, docs/writing-a-cube.md): it defines "
        "`static int pcn_cube_handle(struct __sk_buff *skb, struct pcn_cube_ctx *ctx)` "
        "returning pcn_cube_pass(ctx) or pcn_cube_drop(ctx). Compiled as given by "
        "every node's agent; errors are reported in status.nodes at this text's lines."))
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}, description=(
            "OpenAPI v3 object schema of the parameters NetworkFunctions give in "
            "spec.config. Restricted to what a map value carries: " + RESTRICTION + " (each "
            "may have a description and a default; `required` lists the mandatory ones; "
            f"at most {MAX_PARAMS}). The source reads parameter NAME with "
            "pcn_cube_param(ctx, PCN_PARAM_<NAME>) (camelCase becomes UPPER_SNAKE)."))
    counters: list[str] = Field(
        default_factory=list, max_length=MAX_COUNTERS, description=(
            "Names of the per-instance counters the source increments with "
            "pcn_cube_count(ctx, PCN_COUNTER_<NAME>); `kubectl pcn chain` shows them. "
            f"At most {MAX_COUNTERS}, camelCase."))
    defaultHook: Literal["ingress", "egress"] = Field("ingress", description=(
        "The side of a pod `kubectl pcn add-cube` puts the cube on when --hook is not "
        "given: ingress (traffic to the pod) or egress (traffic from it)."))
    description: str = Field("", max_length=1024, description="What the cube does.")

    @field_validator("counters")
    @classmethod
    def _counters(cls, v: list[str]) -> list[str]:
        for name in v:
            if not PARAM_NAME.match(name):
                raise ValueError(f"counter {name!r} must be camelCase letters and digits")
        if len(set(v)) != len(v):
            raise ValueError("a counter is named more than once")
        return v


class SourceError(Model):
    """One compiler or verifier error, at a line of spec.source."""

    line: int | None = Field(None, description=(
        "Line of spec.source (1-based); absent when the error is not in it (a missing "
        "pcn_cube_handle, a verifier limit)."))
    column: int | None = None
    stage: Literal["name", "schema", "compile", "verify"] = "compile"
    message: str


class CubeTypeNodeStatus(Model):
    """What one node's agent made of the type."""

    ready: bool
    compiled: bool = False
    pods: int = 0
    message: str = ""
    errors: list[SourceError] = Field(default_factory=list, max_length=MAX_ERRORS)
    usedBy: list[str] = Field(default_factory=list, description=(
        "NetworkFunctions (namespace/name) with a cube of this type on the node."))


class CubeTypeStatus(ResourceStatus):
    nodes: dict[str, CubeTypeNodeStatus] = Field(  # type: ignore[assignment]
        default_factory=dict, description="Per node, written by that node's agent.")


class CubeType(Resource):
    kind_name: ClassVar[str] = "CubeType"
    plural: ClassVar[str] = "cubetypes"
    singular: ClassVar[str] = "cubetype"
    short_names: ClassVar[list[str]] = ["ct"]
    namespaced: ClassVar[bool] = False
    description: ClassVar[str] = (
        "A custom transparent cube registered by a cluster admin: its C source, the schema "
        "of its parameters and its counters. NetworkFunctions name it in spec.type.")
    printer_columns: ClassVar[list[dict[str, Any]]] = [
        {"name": "Hook", "type": "string", "jsonPath": ".spec.defaultHook"},
        READY_COLUMN,
        {"name": "Nodes", "type": "integer", "jsonPath": ".status.realizedNodes"},
        REASON_COLUMN,
        AGE_COLUMN,
    ]

    root_rules: ClassVar[list[dict[str, Any]]] = [reserved_name_rule()]

    kind: Literal["CubeType"] = "CubeType"
    spec: CubeTypeSpec
    status: CubeTypeStatus | None = None


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Param:
    """One parameter: its slot (index) in the instance's map value, and how
    its value is read (kind: integer, boolean, enum or ipv4)."""

    name: str
    index: int
    kind: Literal["integer", "boolean", "enum", "ipv4"]
    required: bool = False
    minimum: int = 0
    maximum: int = 0
    enum: tuple[str, ...] = ()
    default: Any = None
    description: str = ""

    @property
    def define(self) -> str:
        """Its C name: PCN_PARAM_<UPPER_SNAKE>."""
        return f"PCN_PARAM_{upper_snake(self.name)}"

    def describe(self) -> str:
        """One line for help texts: kind, range or values, required."""
        what = {"integer": f"integer {self.minimum}..{self.maximum}", "boolean": "boolean",
                "enum": "one of " + "|".join(self.enum), "ipv4": "IPv4 address"}[self.kind]
        extra = " (required)" if self.required else \
            (f" (default {self.default})" if self.default is not None else "")
        return f"{what}{extra}" + (f": {self.description}" if self.description else "")


class SchemaError(ValueError):
    """spec.parameters is outside the restriction; `errors` lists every
    fault as "parameters.<path>: why"."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def upper_snake(name: str) -> str:
    """camelCase -> CAMEL_CASE (dscp -> DSCP, onlyTo -> ONLY_TO)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).upper()


def param_layout(schema: Mapping[str, Any]) -> tuple[Param, ...]:
    """The parameters of a restricted schema, indexed in the alphabetical
    order of their names (index = the word of the map value): the API server
    keeps an object's keys in no particular order (it returns them sorted),
    so the order they were written in cannot be what indexes them. The
    source uses the generated names, never numbers. SchemaError listing
    every fault otherwise."""
    errors: list[str] = []
    if not isinstance(schema, Mapping):
        raise SchemaError(["parameters: must be an object schema"])
    for key in sorted(set(schema) - _OBJECT_KEYS):
        errors.append(f"parameters.{key}: not supported ({RESTRICTION})")
    if schema.get("type", "object") != "object":
        errors.append("parameters.type: must be object")
    if schema.get("additionalProperties", False) is not False:
        errors.append("parameters.additionalProperties: only false is supported")
    props = schema.get("properties") or {}
    if not isinstance(props, Mapping):
        raise SchemaError([*errors, "parameters.properties: must be a map of parameters"])
    required = schema.get("required") or []
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        errors.append("parameters.required: must be a list of parameter names")
        required = []
    for r in required:
        if r not in props:
            errors.append(f"parameters.required: {r!r} is not a property")
    if len(props) > MAX_PARAMS:
        errors.append(f"parameters.properties: at most {MAX_PARAMS} parameters")
    out: list[Param] = []
    defines: dict[str, str] = {}
    for index, (name, prop) in enumerate(sorted(props.items())):
        where = f"parameters.properties.{name}"
        if not PARAM_NAME.match(str(name)):
            errors.append(f"{where}: a name is camelCase letters and digits, up to 31")
            continue
        p = _param(where, str(name), index, prop, str(name) in required, errors)
        if p is None:
            continue
        for define in (p.define, *(enum_define(p, v) for v in p.enum)):
            if define in defines:
                errors.append(f"{where}: {define} is also {defines[define]}'s")
            defines[define] = name
        out.append(p)
    if errors:
        raise SchemaError(errors)
    return tuple(out)


def enum_define(p: Param, value: str) -> str:
    """The C name of an enum value: PCN_PARAM_<NAME>_<VALUE>."""
    return f"{p.define}_{re.sub(r'[^A-Z0-9]', '_', value.upper())}"


def _param(where: str, name: str, index: int, prop: Any, required: bool,
           errors: list[str]) -> Param | None:
    if not isinstance(prop, Mapping):
        errors.append(f"{where}: must be a schema")
        return None
    kind = prop.get("type")
    if kind not in _PARAM_KEYS:
        errors.append(f"{where}.type: {kind!r} is not supported ({RESTRICTION})")
        return None
    bad = sorted(set(prop) - _PARAM_KEYS[kind])
    for key in bad:
        errors.append(f"{where}.{key}: not supported for a {kind} ({RESTRICTION})")
    description = prop.get("description", "")
    default = prop.get("default")
    if kind == "boolean":
        if default is not None and not isinstance(default, bool):
            errors.append(f"{where}.default: must be a boolean")
        return Param(name, index, "boolean", required, default=default,
                     description=str(description))
    if kind == "integer":
        lo, hi = prop.get("minimum"), prop.get("maximum")
        ok = True
        for key, v in (("minimum", lo), ("maximum", hi)):
            if not isinstance(v, int) or isinstance(v, bool):
                errors.append(f"{where}.{key}: required, an integer")
                ok = False
            elif not INT_MIN <= v <= INT_MAX:
                errors.append(f"{where}.{key}: must lie within {INT_MIN}..{INT_MAX}")
                ok = False
        if not ok:
            return None
        assert isinstance(lo, int) and isinstance(hi, int)
        if lo > hi:
            errors.append(f"{where}: minimum {lo} is above maximum {hi}")
            return None
        if default is not None and (not isinstance(default, int) or isinstance(default, bool)
                                    or not lo <= default <= hi):
            errors.append(f"{where}.default: must be an integer within {lo}..{hi}")
        return Param(name, index, "integer", required, lo, hi, default=default,
                     description=str(description))
    enum, fmt = prop.get("enum"), prop.get("format")
    if (enum is None) == (fmt is None):
        errors.append(f"{where}: a string needs exactly one of enum or format: ipv4")
        return None
    if fmt is not None:
        if fmt != "ipv4":
            errors.append(f"{where}.format: {fmt!r} is not supported (only ipv4)")
            return None
        if default is not None and not _is_ipv4(default):
            errors.append(f"{where}.default: must be an IPv4 address")
        return Param(name, index, "ipv4", required, default=default,
                     description=str(description))
    if not isinstance(enum, list) or not enum or not all(
            isinstance(v, str) and ENUM_VALUE.match(v) for v in enum):
        errors.append(f"{where}.enum: a list of 1 or more names (letters, digits, _ . -)")
        return None
    if len(set(enum)) != len(enum):
        errors.append(f"{where}.enum: a value is listed twice")
        return None
    if default is not None and default not in enum:
        errors.append(f"{where}.default: must be one of the enum values")
    return Param(name, index, "enum", required, enum=tuple(enum), default=default,
                 description=str(description))


def _is_ipv4(v: Any) -> bool:
    try:
        ipaddress.IPv4Address(v)
        return isinstance(v, str)
    except ValueError:
        return False


def validation_schema(params: tuple[Param, ...]) -> dict[str, Any]:
    """The JSON schema spec.config is checked against: the restricted one,
    rebuilt from the layout (so nothing outside the restriction ever takes
    part) and closed (additionalProperties false)."""
    return {"type": "object", "properties": {p.name: param_property(p) for p in params},
            "additionalProperties": False, "required": [p.name for p in params if p.required]}


def param_property(p: Param, documented: bool = False) -> dict[str, Any]:
    """The restricted JSON schema of one parameter; `documented`: with its
    default and description too (as a CubeType states it)."""
    if p.kind == "integer":
        out: dict[str, Any] = {"type": "integer", "minimum": p.minimum, "maximum": p.maximum}
    elif p.kind == "boolean":
        out = {"type": "boolean"}
    elif p.kind == "enum":
        out = {"type": "string", "enum": list(p.enum)}
    else:
        out = {"type": "string", "format": "ipv4"}
    if documented and p.default is not None:
        out["default"] = p.default
    if documented and p.description:
        out["description"] = p.description
    return out


def config_errors(params: tuple[Param, ...], config: Mapping[str, Any]) -> list[str]:
    """What is wrong with a NetworkFunction's spec.config for this layout,
    each message naming the field (spec.config.<name>: why); [] when valid.
    Checked with the jsonschema library (Draft 2020-12, ipv4 format
    asserted), imported here: an agent image built before it was a
    dependency reports the config unchecked instead of failing to start."""
    try:
        import jsonschema
    except ImportError as exc:
        return [f"spec.config: cannot be checked on this node ({exc}): rebuild the agent's "
                "image"]
    validator = jsonschema.Draft202012Validator(
        validation_schema(params), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    out: list[str] = []
    for e in sorted(validator.iter_errors(dict(config)), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(x) for x in e.absolute_path)
        if e.validator == "additionalProperties":
            extra = sorted(set(config) - {p.name for p in params})
            out.extend(f"spec.config.{x}: not a parameter of this type" for x in extra)
            continue
        if e.validator == "required":
            missing = [p.name for p in params if p.required and p.name not in config]
            out.extend(f"spec.config.{x}: required" for x in missing)
            continue
        out.append(f"spec.config.{path}: {e.message}" if path else f"spec.config: {e.message}")
    return out


ParamValue = int | bool | str


def config_values(params: tuple[Param, ...], config: Mapping[str, Any]
                  ) -> tuple[tuple[str, ParamValue], ...]:
    """A valid config's values, every parameter present (an absent one takes
    its default, else 0 (its minimum when 0 is out of its range), false, the
    first enum value or 0.0.0.0), in index order: the frozen settings of a
    custom function."""
    out: list[tuple[str, ParamValue]] = []
    for p in params:
        v = config.get(p.name, p.default)
        if v is None:
            zero = 0 if p.minimum <= 0 <= p.maximum else p.minimum
            v = {"integer": zero, "boolean": False, "enum": p.enum[0] if p.enum else "",
                 "ipv4": "0.0.0.0"}[p.kind]
        out.append((p.name, v))
    return tuple(out)


def encode(params: tuple[Param, ...], values: tuple[tuple[str, ParamValue], ...]) -> list[int]:
    """The 64-bit words the cube's map value holds for `values`: integers as
    two's complement, booleans 0/1, enum values by index, an IPv4 address as
    the 32-bit word the packet holds (network byte order in memory, read on
    this host). ValueError for a value the layout does not take."""
    by_name = dict(values)
    words = []
    for p in params:
        v = by_name.get(p.name)
        if p.kind == "integer":
            if not isinstance(v, int) or isinstance(v, bool) or not p.minimum <= v <= p.maximum:
                raise ValueError(f"{p.name}: {v!r} is not an integer in {p.minimum}..{p.maximum}")
            words.append(v & INT_MAX)
        elif p.kind == "boolean":
            words.append(1 if v is True else 0)
        elif p.kind == "enum":
            if v not in p.enum:
                raise ValueError(f"{p.name}: {v!r} is not one of {', '.join(p.enum)}")
            words.append(p.enum.index(str(v)))
        else:
            if not _is_ipv4(v):
                raise ValueError(f"{p.name}: {v!r} is not an IPv4 address")
            packed = ipaddress.IPv4Address(str(v)).packed
            words.append(int.from_bytes(packed, sys.byteorder))
    return words


def c_defines(params: tuple[Param, ...], counters: list[str]) -> str:
    """The #defines the source is compiled with: PCN_PARAM_<NAME> (index),
    PCN_PARAM_<NAME>_<VALUE> (enum value index) and PCN_COUNTER_<NAME>
    (counter index). Names only: never a parameter's value."""
    lines = []
    for p in params:
        lines.append(f"#define {p.define} {p.index}")
        lines.extend(f"#define {enum_define(p, v)} {i}" for i, v in enumerate(p.enum))
    lines.extend(f"#define PCN_COUNTER_{upper_snake(c)} {i}" for i, c in enumerate(counters))
    return "\n".join(lines)
