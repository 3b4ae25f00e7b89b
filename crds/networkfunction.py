"""NetworkFunction: a configured cube, ready to be put in pods' chains."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .common import AGE_COLUMN, READY_COLUMN, REASON_COLUMN, Cidr, Model, Resource
from .quantity import (
    BYTES_FORM,
    RATE_FORM,
    QuantityError,
    bandwidth_bits,
    milli_advice,
    quantity_value,
    unit_advice,
)

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


MAX_FIREWALL_RULES = 10_000


class FirewallConfig(Model):
    rules: list[FirewallRule] = Field(
        default_factory=list, max_length=MAX_FIREWALL_RULES,
        description="Evaluated in order; the first match wins. Up to 10000 rules; the data "
                    "path's cost per packet does not grow with the position of the rule "
                    "that matches.")
    defaultAction: Literal["allow", "drop"] = Field("allow", description=(
        "What traffic no rule matches gets (default allow)."))
    allowReplies: bool | None = Field(
        None, description="When true, packets that answer a connection this firewall "
                           "allowed (from the end that did not open it) pass whatever the "
                           "rules say, as replies to connections a NetworkPolicy allows "
                           "do; the opener's packets are still judged by the rules. The "
                           "firewall must see both directions (be in a chain's ingress and "
                           "egress) for replies to meet it. Absent: false.")


MIN_BURST = 64 * 1024  # bytes: one GSO packet, which a policer cannot split (bpf/policer.c)
MAX_BURST = 2**30  # bytes: keeps the bucket's fixed-point sums in 64 bits (pcn_tbf.h)
# A burst of the rate's half second. A policer drops instead of queueing: when
# the bucket runs dry, a sender far faster than the rate loses its whole
# window and then its retransmissions, and waits for a retransmission timeout
# (Linux's minimum: 200 ms, TCP_RTO_MIN) while the bucket refills only up to
# its burst; a flow then gets about one burst per timeout. Measured on veth
# pairs with GSO (the policer e2e test, bench policer-rate and its sweep), a
# 20 ms bucket let TCP reach 11-25 % of the rate, 50 ms 27 %, 100 ms 47-51 %,
# 200 ms 94-97 %, 500 ms 96-103 % at 10 Mbit/s to 1 Gbit/s: the burst must
# outlast the timeout, with a margin for a busy sender.
DEFAULT_BURST_S = 0.5


def _cel_quantity_range(low: str, high: str, what: str, form: str) -> dict[str, Any]:
    """CEL rules (Kubernetes' quantity library) for the API server to refuse
    text that is no quantity, saying what to write (`form`, as the client
    says it), and a quantity outside low..high, as the agent's validator
    does; "50m" is told that m is milli. No `pattern` besides: the API
    server would print its regular expression as the message."""
    milli = (f"'m is milli, a thousandth: ' + self + ' is below {low} {what}; for mega "
             f"write M (50M is 50 million {what})'")
    return {"x-kubernetes-validations": [
        {"rule": "isQuantity(self)", "message": form},
        {"rule": f"!isQuantity(self) || (quantity(self).compareTo(quantity('{low}')) >= 0 && "
                 f"quantity(self).compareTo(quantity('{high}')) <= 0)",
         "messageExpression": f"self.endsWith('m') ? {milli} : "
                              f"'must be a quantity of {what} from {low} to {high}'"}]}


class PolicerConfig(Model):
    """A token bucket: `rate` bits per second on average, `burst` bytes at once."""

    rate: str = Field(json_schema_extra=_cel_quantity_range(
        "1k", "1P", "bits per second", RATE_FORM), description=(
        "Average rate in bits per second, a Kubernetes quantity as the "
        "kubernetes.io/ingress-bandwidth annotation takes it: 10M, 1G, 500k (1k to 1P). "
        "Counted on frames, Ethernet header included (a GSO packet's headers once)."))
    burst: str | None = Field(None, json_schema_extra=_cel_quantity_range(
        "64Ki", "1Gi", "bytes", BYTES_FORM), description=(
        "Bucket size in bytes, a quantity: 64Ki, 1M, 256k (64Ki to 1Gi). "
        "What may pass at once after a quiet period. Default: what the rate sends in "
        "half a second (TCP needs about that much to reach the rate), at least 64Ki."))
    scope: Literal["pod", "shared"] | None = Field(None, description=(
        "pod (default): one bucket per pod the function is on, each limited to "
        "the rate; shared: one bucket for all of them together."))

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str) -> str:
        try:
            bandwidth_bits(v)
        except QuantityError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("burst")
    @classmethod
    def _burst(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            n = quantity_value(v)
        except QuantityError:
            raise ValueError(f"{v!r} is not a quantity: {BYTES_FORM}"
                             f"{unit_advice(v, 'byte')}") from None
        if not MIN_BURST <= n <= MAX_BURST:
            raise ValueError(f"{v!r} ({n} bytes) must lie within 64Ki-1Gi bytes"
                             f"{milli_advice(v)}")
        return v

    def rate_bits(self) -> int:
        """The rate in bit/s."""
        return bandwidth_bits(self.rate)

    def burst_bytes(self) -> int:
        """The burst in bytes, the default one when none is given."""
        if self.burst is not None:
            return quantity_value(self.burst)
        return default_burst(self.rate_bits())

    def scope_or_default(self) -> Literal["pod", "shared"]:
        return self.scope or "pod"


def default_burst(rate_bits: int) -> int:
    """A burst for `rate_bits` bit/s when none is given: DEFAULT_BURST_S of the
    rate, within MIN_BURST..MAX_BURST bytes."""
    return max(MIN_BURST, min(MAX_BURST, int(rate_bits * DEFAULT_BURST_S) // 8))


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


SNAP_MAX = 8192  # the packetcapture cube's largest copy of a frame (CAP_SNAP_MAX), bytes
DEFAULT_CAPTURE_RATE = 2000  # copies a second, as `kubectl pcn capture --rate`
MAX_CAPTURE_RATE = 100_000


class PacketCaptureConfig(Model):
    """packetcapture: a capture point kept in the pods' chain, compiled and
    attached once, so that `kubectl pcn capture POD` starts at once and reads
    from it (with its filter, or a narrower --filter). While nobody reads,
    it copies nothing: it counts the frames its filter matches (status:
    matchedPackets)."""

    filter: str | None = Field(None, max_length=1024, description=(
        "What it captures, in tcpdump's syntax for host/net/port/portrange with "
        "src/dst, tcp/udp/icmp/sctp/ip/arp, and/or/not and parentheses "
        "(pcap-filter(7)); default: every frame."))
    snapLength: int | None = Field(None, ge=1, le=SNAP_MAX, description=(
        f"Bytes kept of each frame (1-{SNAP_MAX}); default {SNAP_MAX}."))
    maxPacketsPerSecond: int | None = Field(None, ge=1, le=MAX_CAPTURE_RATE, description=(
        "Frames copied a second at most while a capture reads (more are counted); "
        f"default {DEFAULT_CAPTURE_RATE}."))

    @field_validator("filter")
    @classmethod
    def _filter(cls, v: str | None) -> str | None:
        from .capfilter import FilterError, compile_filter

        if v is not None:
            try:
                compile_filter(v)
            except FilterError as exc:
                raise ValueError(str(exc)) from None
        return v

    @property
    def snaplen(self) -> int:
        return self.snapLength or SNAP_MAX

    @property
    def budget(self) -> int:
        return self.maxPacketsPerSecond or DEFAULT_CAPTURE_RATE


# Each function type and the model of its config; the CRD schema, the agent
# (pcn_agent.dataplane.cubes.functions) and kubectl pcn add-cube all follow
# this table, so a new cube type is one entry here and one there.
FUNCTION_TYPES: dict[str, type[Model]] = {"firewall": FirewallConfig, "policer": PolicerConfig,
                                          "flowmonitor": FlowMonitorConfig,
                                          "packetcapture": PacketCaptureConfig}
# FUNCTION_TYPES' keys (a test checks)
FunctionType = Literal["firewall", "policer", "flowmonitor", "packetcapture"]
# A built-in type or a CubeType's name (pcn_crds.cubetype, cluster-scoped).
TYPE_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"


class NetworkFunctionSpec(Model):
    type: str = Field(max_length=63, pattern=TYPE_PATTERN, description=(
        "The cube type: firewall (ordered allow/drop rules), policer (a token bucket "
        "rate limit), flowmonitor (per-flow counters, `kubectl pcn flows`), packetcapture "
        "(a capture point `kubectl pcn capture` reads), or the name "
        "of a CubeType a cluster admin registered (`kubectl get cubetypes`). spec.config "
        "holds the fields of that type, marked (firewall), (policer), (flowmonitor) or "
        "(packetcapture), or a CubeType's parameters (its spec.parameters)."))
    config: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="Configuration, typed by spec.type.")

    @field_validator("config", mode="before")
    @classmethod
    def _plain(cls, v: Any) -> Any:
        return dict(v) if v is not None else {}

    @field_validator("config")
    @classmethod
    def _typed(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Validated by spec.type's model; its errors are located under
        spec.config (a field validator's errors get the field's place)."""
        type_name = info.data.get("type")
        if type_name not in FUNCTION_TYPES:
            return v  # spec.type has its own error
        return FUNCTION_TYPES[type_name].model_validate(v).model_dump(exclude_none=True)

    def is_builtin(self) -> bool:
        """A type of FUNCTION_TYPES, not a CubeType."""
        return self.type in FUNCTION_TYPES

    def typed_config(self) -> Model:
        """The config as its built-in type's model (KeyError for a CubeType:
        the agent checks those against the CubeType's schema)."""
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
