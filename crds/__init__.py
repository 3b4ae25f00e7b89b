"""pcn's custom resources (group pcn.dev, version v1alpha1) as pydantic models.

The models are the single source of truth: the CRD YAML next to this file is
generated from them (`make crds`), and a test fails when the two drift.
"""

from .common import GROUP, VERSION, Condition, ObjectMeta, ResourceStatus
from .cubechain import CubeChain, CubeChainSpec, FunctionRef, LabelSelector
from .cubetype import CubeType, CubeTypeSpec
from .networkfunction import (
    FUNCTION_TYPES,
    FirewallConfig,
    FirewallRule,
    FlowMonitorConfig,
    NetworkFunction,
    PacketCaptureConfig,
)
from .nodeportrule import NodePortRule, NodePortRuleSpec

__all__ = [
    "GROUP", "VERSION", "Condition", "ObjectMeta", "ResourceStatus", "CubeChain",
    "CubeChainSpec", "CubeType", "CubeTypeSpec", "FunctionRef", "LabelSelector", "FUNCTION_TYPES",
    "FirewallConfig", "FirewallRule", "FlowMonitorConfig", "NetworkFunction", "NodePortRule",
    "PacketCaptureConfig",
    "NodePortRuleSpec",
]
