"""Generate the CRD manifests from the pydantic models.

    python -m pcn_crds.generate          # write crds/*.yaml
    python -m pcn_crds.generate --check  # exit 1 when the files are out of date

The JSON schema pydantic produces is turned into a structural OpenAPI v3
schema as the API server requires: references inlined, nullable instead of
anyOf-with-null, no titles, types on every node.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from .common import GROUP, VERSION, Resource
from .cubechain import CubeChain
from .cubetype import CubeType
from .networkfunction import FUNCTION_TYPES, NetworkFunction
from .nodeportrule import NodePortRule

HERE = Path(__file__).resolve().parent
RESOURCES: list[type[Resource]] = [NetworkFunction, CubeChain, NodePortRule, CubeType]
CATEGORIES = ["pcn", "all-pcn"]
_DROP = {"title", "$defs", "discriminator"}


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline references and rewrite a pydantic JSON schema node into a
    structural OpenAPI v3 one."""
    if "$ref" in schema:
        target = defs[schema["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs)
    node = {k: v for k, v in schema.items() if k not in _DROP}
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express a union as a structural schema: {any_of}")
        inner = structural(non_null[0], defs)
        node = {**inner, **node, "nullable": True} if len(non_null) < len(any_of) else \
            {**inner, **node}
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    if node.get("default", 0) is None:
        del node["default"]
    if node.get("format") == "cidr":
        del node["format"]
    if "properties" in node:
        node["properties"] = {k: structural(v, defs) for k, v in node["properties"].items()}
        node.setdefault("type", "object")
    if node.get("additionalProperties") in (False, True):
        # false: unknown fields are pruned anyway, and false is not structural;
        # true (a free-form map): x-kubernetes-preserve-unknown-fields says it
        del node["additionalProperties"]
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = structural(node["additionalProperties"], defs)
    if "items" in node:
        node["items"] = structural(node["items"], defs)
    if node.get("type") == "object" and "properties" not in node and \
            "additionalProperties" not in node:
        node["x-kubernetes-preserve-unknown-fields"] = True
    return node


def _schema_of(model: type[Resource]) -> dict[str, Any]:
    full = model.model_json_schema(mode="validation")
    defs = full.get("$defs", {})
    spec = structural(full["properties"]["spec"], defs)
    status = structural(full["properties"]["status"], defs)
    if model is NetworkFunction:
        spec["properties"]["config"] = _function_config_schema()
        spec["x-kubernetes-validations"] = _function_type_rules()
    root: dict[str, Any] = {
        "type": "object",
        "description": model.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if model.root_rules:
        root["x-kubernetes-validations"] = copy.deepcopy(model.root_rules)
    return root


def _function_config_schema() -> dict[str, Any]:
    """spec.config holds the fields of every function type's config (each
    optional, each description marked with its type); which apply is decided
    by spec.type, and the agent reports a field that does not belong (or a
    missing one) in the object's status. No field has a default here: the API
    server would write it into every type's config (a firewall's defaultAction
    into a policer's); the agent's models apply them."""
    props: dict[str, Any] = {}
    for type_name, config_model in FUNCTION_TYPES.items():
        full = config_model.model_json_schema(mode="validation")
        node = structural(full, full.get("$defs", {}))
        for name, prop in node.get("properties", {}).items():
            if name in props:
                raise ValueError(f"spec.config.{name} is a field of two function types")
            prop = {k: v for k, v in prop.items() if k != "default"}
            prop["description"] = f"({type_name}) {prop.get('description', '')}".rstrip()
            props[name] = prop
    types = ", ".join(f"({t}) for a {t}" for t in FUNCTION_TYPES)
    # a CubeType's parameters are its own schema's (checked by the agents,
    # which report the field in the NetworkFunction's status): kept, not pruned
    return {"type": "object", "description": "Configuration of the spec.type cube: the fields "
            f"marked {types}; for a CubeType, its parameters (its spec.parameters).",
            "properties": props, "x-kubernetes-preserve-unknown-fields": True}


def _function_type_rules() -> list[dict[str, Any]]:
    """CEL rules on spec: a type's required config fields are there, and no
    field of another type is (the merged spec.config schema alone allows
    both)."""
    rules = []
    builtin = ", ".join(f"'{t}'" for t in FUNCTION_TYPES)
    for type_name, config_model in FUNCTION_TYPES.items():
        fields = list(config_model.model_fields)
        required = [f for f, info in config_model.model_fields.items() if info.is_required()]
        for f in required:
            rules.append({
                "rule": f"self.type != '{type_name}' || (has(self.config) && "
                        f"has(self.config.{f}))",
                "message": f"a {type_name} needs spec.config.{f}",
                "fieldPath": f".config.{f}", "reason": "FieldValueRequired"})
        absent = " && ".join(f"!has(self.config.{f})" for f in fields)
        rules.append({
            "rule": f"!(self.type in [{builtin}]) || self.type == '{type_name}' || "
                    f"!has(self.config) || ({absent})",
            "message": f"{', '.join(fields)}: field(s) of a {type_name}, not of this "
                       f"spec.type",
            "fieldPath": ".config", "reason": "FieldValueForbidden"})
    return rules


def crd(model: type[Resource]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{model.plural}.{GROUP}",
                     "labels": {"app.kubernetes.io/part-of": "pcn"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced" if model.namespaced else "Cluster",
            "names": {"kind": model.kind_name, "plural": model.plural,
                      "singular": model.singular, "shortNames": list(model.short_names),
                      "categories": list(CATEGORIES)},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": copy.deepcopy(model.printer_columns),
                "schema": {"openAPIV3Schema": _schema_of(model)},
            }],
        },
    }


def path_of(model: type[Resource]) -> Path:
    return HERE / f"{GROUP}_{model.plural}.yaml"


def render(model: type[Resource]) -> str:
    header = ("# Generated from the pydantic model in crds/ by `make crds`; do not edit.\n")
    return header + yaml.safe_dump(crd(model), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pcn_crds.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if a checked-in CRD differs from the models")
    args = ap.parse_args(argv)
    stale = []
    for model in RESOURCES:
        text, path = render(model), path_of(model)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `make crds` and commit the result",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
