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
    with pytest.raises(ValidationError, match="String should match pattern"):
        NetworkFunction.model_validate({"kind": "NetworkFunction", "spec": {"type": "Router"}})
    # any other name is a CubeType's, its config checked by the agents against its schema
    NetworkFunction.model_validate({"kind": "NetworkFunction", "spec": {
        "type": "dscp-marker", "config": {"dscp": 46}}})
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


# ---------------------------------------------------------------------------- function types
def _nf(spec: dict) -> NetworkFunction:
    return NetworkFunction.model_validate({"kind": "NetworkFunction", "spec": spec})


def test_every_function_type_is_in_the_type_literal_and_the_schema() -> None:
    from typing import get_args

    from pcn_crds.networkfunction import FUNCTION_TYPES, FunctionType

    assert set(get_args(FunctionType)) == set(FUNCTION_TYPES)
    spec = crd(NetworkFunction)["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]
    # a built-in type or a CubeType's name: the agents report an unknown one
    assert spec["properties"]["type"]["pattern"] == "^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
    assert all(t in spec["properties"]["type"]["description"] for t in FUNCTION_TYPES)
    # a CubeType's parameters are kept, not pruned
    assert spec["properties"]["config"]["x-kubernetes-preserve-unknown-fields"] is True
    config = spec["properties"]["config"]["properties"]
    for type_name, model in FUNCTION_TYPES.items():
        for field in model.model_fields:
            assert config[field]["description"].startswith(f"({type_name})"), field
            # a default would be written into every type's config by the API server
            assert "default" not in config[field], field


def test_policer_config_validates_quantities() -> None:
    from pcn_crds.networkfunction import MIN_BURST, PolicerConfig

    nf = _nf({"type": "policer", "config": {"rate": "10M", "burst": "1Mi", "scope": "shared"}})
    cfg = nf.spec.typed_config()
    assert isinstance(cfg, PolicerConfig)
    assert (cfg.rate_bits(), cfg.burst_bytes(), cfg.scope_or_default()) == \
        (10_000_000, 1 << 20, "shared")
    cfg = _nf({"type": "policer", "config": {"rate": "1G"}}).spec.typed_config()
    assert isinstance(cfg, PolicerConfig)
    assert (cfg.burst_bytes(), cfg.scope_or_default()) == (10**9 // 2 // 8, "pod")
    cfg = _nf({"type": "policer", "config": {"rate": "1M"}}).spec.typed_config()
    assert isinstance(cfg, PolicerConfig) and cfg.burst_bytes() == MIN_BURST  # 62.5 kB < 64Ki
    with pytest.raises(ValidationError, match=r"config\.rate|rate\n.*Field required"):
        _nf({"type": "policer", "config": {}})
    with pytest.raises(ValidationError, match="unreasonably small"):
        _nf({"type": "policer", "config": {"rate": "999"}})
    with pytest.raises(ValidationError, match="unreasonably large"):
        _nf({"type": "policer", "config": {"rate": "2P"}})
    # what to write, not a regular expression (trial of issue 12)
    for text, advice in (("10 Mbit", "write 10M"), ("50mbit", "write 50M"),
                         ("50Mbps", "write 50M"), ("10MB", "write 80M")):
        with pytest.raises(ValidationError) as err:
            _nf({"type": "policer", "config": {"rate": text}})
        assert "use a Kubernetes quantity of bits per second such as 50M (50 Mbit/s) or 1G" \
            in str(err.value) and advice in str(err.value) and "pattern" not in str(err.value)
    with pytest.raises(ValidationError, match="m is milli, a thousandth: for mega write 50M"):
        _nf({"type": "policer", "config": {"rate": "50m"}})
    with pytest.raises(ValidationError, match="quantity of bytes such as 64Ki.*write 1M"):
        _nf({"type": "policer", "config": {"rate": "10M", "burst": "1MB"}})
    with pytest.raises(ValidationError, match="within 64Ki-1Gi"):
        _nf({"type": "policer", "config": {"rate": "10M", "burst": "1k"}})
    # a field of another type is refused, with its name
    with pytest.raises(ValidationError, match="defaultAction"):
        _nf({"type": "policer", "config": {"rate": "10M", "defaultAction": "drop"}})
    with pytest.raises(ValidationError, match="rate"):
        _nf({"type": "firewall", "config": {"rate": "10M"}})


@pytest.mark.parametrize("text,value", [
    ("10M", 10**7), ("1G", 10**9), ("500k", 500_000), ("1Ki", 1024), ("1.5Mi", 1572864),
    ("1e6", 10**6), ("1E3", 1000), ("+2k", 2000), ("100m", 1), ("0.5", 1), ("1P", 10**15),
    (".5k", 500), ("3.", 3), ("10Gi", 10 * 2**30),
])
def test_quantities_as_apimachinery_reads_them(text: str, value: int) -> None:
    from pcn_crds.quantity import quantity_value

    assert quantity_value(text) == value


@pytest.mark.parametrize("text", ["", "M", "10 M", "10Mb", "1.2.3", "1e", "ki", "10KI", "."])
def test_not_quantities(text: str) -> None:
    from pcn_crds.quantity import QuantityError, parse_quantity

    with pytest.raises(QuantityError):
        parse_quantity(text)


def test_bandwidth_bounds_are_kubelets() -> None:
    from pcn_crds.quantity import QuantityError, bandwidth_bits

    assert bandwidth_bits("1k") == 1000 and bandwidth_bits("1P") == 10**15
    for bad in ("999", "1.1P", "100m"):
        with pytest.raises(QuantityError):
            bandwidth_bits(bad)


def test_cel_rules_guard_each_types_fields() -> None:
    """What the merged spec.config schema cannot say, CEL rules on spec do (a
    real API server runs them in test_crds_apiserver.py)."""
    from pcn_crds.networkfunction import FUNCTION_TYPES
    from pcn_crds.quantity import BYTES_FORM, RATE_FORM

    spec = crd(NetworkFunction)["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]
    rules = spec["x-kubernetes-validations"]
    for type_name, model in FUNCTION_TYPES.items():
        builtin = ", ".join(f"'{t}'" for t in FUNCTION_TYPES)
        forbidden = [r for r in rules if r["rule"].startswith(
            f"!(self.type in [{builtin}]) || self.type == '{type_name}'")]
        assert len(forbidden) == 1
        assert all(f"!has(self.config.{f})" in forbidden[0]["rule"] for f in model.model_fields)
        for f, info in model.model_fields.items():
            if info.is_required():
                assert any(r["fieldPath"] == f".config.{f}" and r["reason"] ==
                           "FieldValueRequired" for r in rules), f
    config = spec["properties"]["config"]["properties"]
    for field, form in (("rate", RATE_FORM), ("burst", BYTES_FORM)):
        assert "pattern" not in config[field]  # the API server would print the expression
        is_quantity, in_range = config[field]["x-kubernetes-validations"]
        assert is_quantity == {"rule": "isQuantity(self)", "message": form}
        assert "quantity(self).compareTo" in in_range["rule"]
        assert "m is milli" in in_range["messageExpression"]
