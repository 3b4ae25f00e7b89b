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


class FlowMonitorConfig(Model):
    """flowmonitor: per-flow accounting (5-tuple and direction: packets, L3
    bytes as conntrack counts them, first/last seen, TCP flags) in a table of
    at most maxFlows entries, the least recently used flow making room."""

    maxFlows: int = Field(1024, ge=1, le=65536,
                          description="Flows kept per node (an LRU table).")


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
        self.config = FUNCTION_TYPES[self.type].model_validate(self.config).model_dump(
            exclude_none=True)
        return self

    def typed_config(self) -> Model:
        return FUNCTION_TYPES[self.type].model_validate(self.config)


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
