"""Pieces shared by every pcn custom resource."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

GROUP = "pcn.dev"
VERSION = "v1alpha1"
# Spelled out, not an f-string, so that its type is the Literal Resource.apiVersion has.
API_VERSION: Final = "pcn.dev/v1alpha1"
assert API_VERSION == f"{GROUP}/{VERSION}"


class Model(BaseModel):
    """Strict about unknown fields (a typo is an error, not a silent no-op)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.IPv4Network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address or CIDR (e.g. 10.0.0.0/8)") from None


def _ip(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


Cidr = Annotated[str, AfterValidator(_cidr), Field(json_schema_extra={"format": "cidr"})]
IPv4 = Annotated[str, AfterValidator(_ip), Field(json_schema_extra={"format": "ipv4"})]
Port = Annotated[int, Field(ge=1, le=65535)]
Protocol = Literal["TCP", "UDP", "SCTP"]


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata pcn reads; everything else is kept."""

    model_config = ConfigDict(extra="allow")
    name: str = ""
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


class NodeStatus(Model):
    """What one node's agent realised."""

    ready: bool
    pods: int = 0
    message: str = ""


class ResourceStatus(Model):
    observedGeneration: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    nodes: dict[str, NodeStatus] = Field(
        default_factory=dict, description="Per node, written by that node's agent.")
    realizedNodes: int = Field(0, description="Nodes whose agent realised the object.")
    realizedPods: int = Field(0, description="Pods the object is in force on, all nodes.")


class Resource(Model):
    """A custom resource: apiVersion, kind, metadata, spec, status."""

    kind_name: ClassVar[str]
    plural: ClassVar[str]
    singular: ClassVar[str]
    short_names: ClassVar[list[str]]
    namespaced: ClassVar[bool]
    printer_columns: ClassVar[list[dict[str, Any]]]
    description: ClassVar[str]
    # CEL rules on the whole object (x-kubernetes-validations at the schema's
    # root, where self.metadata.name can be read)
    root_rules: ClassVar[list[dict[str, Any]]] = []

    apiVersion: Literal["pcn.dev/v1alpha1"] = API_VERSION
    kind: str
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    status: ResourceStatus | None = None

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """Validate an object as read from the API (kopf body or dict)."""
        return cls.model_validate(dict(body))


READY_COLUMN = {"name": "Ready", "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}
REASON_COLUMN = {"name": "Reason", "type": "string", "priority": 1,
                 "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'}
AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
