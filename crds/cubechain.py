"""CubeChain: which NetworkFunctions go in the data path of which pods, on
which side, in what order."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from .common import AGE_COLUMN, READY_COLUMN, REASON_COLUMN, Model, Resource


class LabelSelectorRequirement(Model):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class LabelSelector(Model):
    matchLabels: dict[str, str] = Field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        for k, v in self.matchLabels.items():
            if labels.get(k) != v:
                return False
        for e in self.matchExpressions:
            present = e.key in labels
            if e.operator == "In" and not (present and labels[e.key] in e.values):
                return False
            if e.operator == "NotIn" and present and labels[e.key] in e.values:
                return False
            if e.operator == "Exists" and not present:
                return False
            if e.operator == "DoesNotExist" and present:
                return False
        return True


class FunctionRef(Model):
    function: str = Field(description="Name of a NetworkFunction in the chain's namespace.")


class CubeChainSpec(Model):
    podSelector: LabelSelector = Field(
        default_factory=LabelSelector,
        description="Pods of the namespace the chain applies to; empty selects every pod.")
    ingress: list[FunctionRef] = Field(
        default_factory=list, max_length=6,
        description="Functions traffic goes through before it reaches a pod, in order.")
    egress: list[FunctionRef] = Field(
        default_factory=list, max_length=6,
        description="Functions traffic goes through after it leaves a pod, in order.")
    priority: int = Field(100, ge=0, le=1000,
                          description="Chains selecting the same pod apply in ascending "
                                      "priority, then by name.")

    @model_validator(mode="after")
    def _unambiguous(self) -> CubeChainSpec:
        for side in ("ingress", "egress"):
            names = [r.function for r in getattr(self, side)]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{side} lists {', '.join(dupes)} more than once; a function "
                                 "appears at most once per side so the order is unambiguous")
        return self


class CubeChain(Resource):
    kind_name: ClassVar[str] = "CubeChain"
    plural: ClassVar[str] = "cubechains"
    singular: ClassVar[str] = "cubechain"
    short_names: ClassVar[list[str]] = ["cc", "chain"]
    namespaced: ClassVar[bool] = True
    description: ClassVar[str] = ("Puts NetworkFunctions, in order, in the data path of the "
                                  "selected pods of a namespace.")
    printer_columns: ClassVar[list[dict[str, Any]]] = [
        READY_COLUMN,
        {"name": "Pods", "type": "integer", "jsonPath": ".status.realizedPods"},
        {"name": "Nodes", "type": "integer", "jsonPath": ".status.realizedNodes"},
        REASON_COLUMN,
        AGE_COLUMN,
    ]

    kind: Literal["CubeChain"] = "CubeChain"
    spec: CubeChainSpec
