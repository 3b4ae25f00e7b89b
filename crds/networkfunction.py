"""NetworkFunction: a configured cube, ready to be put in pods' chains."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from .common import AGE_COLUMN, READY_COLUMN, REASON_COLUMN, Cidr, Model, Resource

PortSpec = str  # "22" or "8000-8080"


class FirewallRule(Model):
    action: Literal["allow", "drop"]
    protocol: Literal["tcp", "udp", "icmp", "sctp"] | None = None
    source: Cidr | None = Field(None, description="Source CIDR; any when absent.")
    destination: Cidr | None = Field(None, description="Destination CIDR; any when absent.")
    sourcePorts: PortSpec | None = Field(None, pattern=r"^[0-9]{1,5}(-[0-9]{1,5})?$",
                                         description="A port or a range, e.g. 8000-8080.")
    destinationPorts: PortSpec | None = Field(None, pattern=r"^[0-9]{1,5}(-[0-9]{1,5})?$",
                                              description="A port or a range, e.g. 22.")

    @model_validator(mode="after")
    def _ports(self) -> FirewallRule:
        for name in ("sourcePorts", "destinationPorts"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.protocol not in ("tcp", "udp", "sctp"):
                raise ValueError(f"{name} needs protocol tcp, udp or sctp")
            lo, _, hi = value.partition("-")
            lo_i, hi_i = int(lo), int(hi or lo)
            if not (1 <= lo_i <= hi_i <= 65535):
                raise ValueError(f"{name} {value!r} must lie within 1-65535, low to high")
        return self

    def to_text(self) -> str:
        """The rule in the firewall cube's rule language."""
        parts: list[str] = [self.action]
        if self.protocol:
            parts.append(self.protocol)
        if self.source:
            parts += ["from", self.source]
        if self.destination:
            parts += ["to", self.destination]
        if self.sourcePorts:
            parts += ["sport", self.sourcePorts]
        if self.destinationPorts:
            parts += ["dport", self.destinationPorts]
        return " ".join(parts)


class FirewallConfig(Model):
    rules: list[FirewallRule] = Field(default_factory=list, max_length=64,
                                      description="Evaluated in order; the first match wins.")
    defaultAction: Literal["allow", "drop"] = "allow"


DEFAULT_MAX_FLOWS = 1024


class FlowMonitorConfig(Model):
    """flowmonitor: per-flow accounting (5-tuple and direction: packets, L3
    bytes as conntrack counts them, first/last seen, TCP flags) in a table of
    at most maxFlows entries, the least recently used flow making room."""

    # No schema default: the CRD's config schema is the union of every type's,
    # and the API server would write a default into every type's config (a
    # firewall's too, which refuses unknown fields).
    maxFlows: int | None = Field(None, ge=1, le=65536,
                                 description="Flows kept per node (an LRU table); default "
                                             f"{DEFAULT_MAX_FLOWS}.")

    @property
    def max_flows(self) -> int:
        return self.maxFlows or DEFAULT_MAX_FLOWS


# Each function type and the model of its config; the CRD schema and the
# agent both follow this table, so a new cube type is one entry here.
FUNCTION_TYPES: dict[str, type[Model]] = {"firewall": FirewallConfig,
                                          "flowmonitor": FlowMonitorConfig}


class NetworkFunctionSpec(Model):
    type: Literal["firewall", "flowmonitor"] = Field(description="The cube type.")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="Configuration, typed by spec.type.")

    @field_validator("config", mode="before")
    @classmethod
    def _plain(cls, v: Any) -> Any:
        return dict(v) if v is not None else {}

    @model_validator(mode="after")
    def _typed(self) -> NetworkFunctionSpec:
        self.config = FUNCTION_TYPES[self.type].model_validate(
            own_config(self.type, self.config)).model_dump(exclude_none=True)
        return self

    def typed_config(self) -> Model:
        return FUNCTION_TYPES[self.type].model_validate(
            own_config(self.type, self.config))


def own_config(type_: str, config: dict[str, Any]) -> dict[str, Any]:
    """`config` less the keys another type's schema defaults, when they hold
    that default: the CRD's config schema is the union of every type's, and
    a real API server writes each default it has into every object (a
    flowmonitor gets the firewall's defaultAction: allow). The emulated one
    does not, so only a real cluster shows it."""
    own = FUNCTION_TYPES[type_].model_fields
    defaults = {name: f.default for t, model in FUNCTION_TYPES.items() if t != type_
                for name, f in model.model_fields.items()
                if name not in own and not f.is_required() and f.default_factory is None
                and f.default is not None}
    return {k: v for k, v in config.items() if k not in defaults or v != defaults[k]}


class NetworkFunction(Resource):
    kind_name: ClassVar[str] = "NetworkFunction"
    plural: ClassVar[str] = "networkfunctions"
    singular: ClassVar[str] = "networkfunction"
    short_names: ClassVar[list[str]] = ["nf", "cube"]
    namespaced: ClassVar[bool] = True
    description: ClassVar[str] = ("A configured cube (network function) that CubeChains put "
                                  "in the data path of pods.")
    printer_columns: ClassVar[list[dict[str, Any]]] = [
        {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
        READY_COLUMN,
        {"name": "Pods", "type": "integer", "jsonPath": ".status.realizedPods"},
        REASON_COLUMN,
        AGE_COLUMN,
    ]

    kind: Literal["NetworkFunction"] = "NetworkFunction"
    spec: NetworkFunctionSpec
