"""NodePortRule: a NodePort translation as the k8sdispatcher sees it. Agents
derive one from each NodePort Service port (owned by the Service); people may
add static ones pointing at a Service or at explicit backends."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from .common import AGE_COLUMN, READY_COLUMN, REASON_COLUMN, IPv4, Model, Port, Protocol, Resource


class ServiceRef(Model):
    namespace: str
    name: str
    port: Port = Field(description="The Service port whose endpoints serve this rule.")


class StaticBackend(Model):
    ip: IPv4
    port: Port
    weight: int = Field(1, ge=0, le=1000000)


class NodePortRuleSpec(Model):
    port: int = Field(ge=1, le=65535, description="The port on every node address.")
    protocol: Protocol = "TCP"
    externalTrafficPolicy: Literal["Cluster", "Local"] = "Cluster"
    internalSource: IPv4 | None = Field(
        None, description="Source address for Cluster traffic (default: the node's VTEP).")
    service: ServiceRef | None = None
    backends: list[StaticBackend] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_target(self) -> NodePortRuleSpec:
        if (self.service is None) == (not self.backends):
            raise ValueError("give exactly one of spec.service or spec.backends")
        return self


class NodePortRule(Resource):
    kind_name: ClassVar[str] = "NodePortRule"
    plural: ClassVar[str] = "nodeportrules"
    singular: ClassVar[str] = "nodeportrule"
    short_names: ClassVar[list[str]] = ["npr"]
    namespaced: ClassVar[bool] = False
    description: ClassVar[str] = "A NodePort translation realised by every node's k8sdispatcher."
    printer_columns: ClassVar[list[dict[str, Any]]] = [
        {"name": "Port", "type": "integer", "jsonPath": ".spec.port"},
        {"name": "Protocol", "type": "string", "jsonPath": ".spec.protocol"},
        {"name": "Policy", "type": "string", "jsonPath": ".spec.externalTrafficPolicy"},
        READY_COLUMN,
        {"name": "Nodes", "type": "integer", "jsonPath": ".status.realizedNodes"},
        REASON_COLUMN,
        AGE_COLUMN,
    ]

    kind: Literal["NodePortRule"] = "NodePortRule"
    spec: NodePortRuleSpec
