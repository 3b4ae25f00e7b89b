"""The CRD YAML is generated from the pydantic models and must not drift."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from pcn_crds import CubeChain, NetworkFunction, NodePortRule
from pcn_crds.generate import RESOURCES, crd, main, path_of, render


@pytest.mark.parametrize("model", RESOURCES, ids=lambda m: m.kind_name)
def test_checked_in_crd_matches_the_model(model) -> None:
    assert path_of(model).read_text() == render(model), \
        f"{path_of(model).name} is stale: run `make crds` and commit it"


def test_check_mode_reports_drift(tmp_path, monkeypatch) -> None:
    assert main(["--check"]) == 0
    import pcn_crds.generate as gen

    monkeypatch.setattr(gen, "HERE", tmp_path)
    assert main(["--check"]) == 1  # nothing generated in an empty directory


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


@pytest.mark.parametrize("model", RESOURCES, ids=lambda m: m.kind_name)
def test_schema_is_structural(model) -> None:
    doc = crd(model)
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert doc["spec"]["names"]["shortNames"] and doc["spec"]["names"]["categories"]
    assert any(c["name"] == "Ready" for c in version["additionalPrinterColumns"])
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        if not isinstance(node, dict) or path.endswith(".properties"):
            continue
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
            assert banned not in node, f"{path} uses {banned}"
        if "properties" in node or "items" in node:
            assert "type" in node, f"{path} has no type"
        assert node.get("additionalProperties") is not False, path
    yaml.safe_load(render(model))


def test_models_validate_what_users_write() -> None:
    NetworkFunction.model_validate({
        "kind": "NetworkFunction", "metadata": {"name": "fw", "namespace": "a"},
        "spec": {"type": "firewall", "config": {"rules": [
            {"action": "drop", "protocol": "tcp", "destinationPorts": "22"}]}}})
    with pytest.raises(ValidationError, match="Input should be 'firewall'"):
        NetworkFunction.model_validate({"kind": "NetworkFunction", "spec": {"type": "router"}})
    with pytest.raises(ValidationError, match="not an IPv4"):
        NetworkFunction.model_validate({"kind": "NetworkFunction", "spec": {
            "type": "firewall", "config": {"rules": [{"action": "drop", "source": "1.2.3/40"}]}}})
    with pytest.raises(ValidationError, match="extra"):
        NetworkFunction.model_validate({"kind": "NetworkFunction", "spec": {
            "type": "firewall", "config": {"rulez": []}}})
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        NodePortRule.model_validate({"kind": "NodePortRule", "spec": {
            "port": 70000, "backends": [{"ip": "10.0.0.1", "port": 80}]}})
    with pytest.raises(ValidationError, match="more than once"):
        CubeChain.model_validate({"kind": "CubeChain", "spec": {
            "ingress": [{"function": "a"}, {"function": "a"}]}})
