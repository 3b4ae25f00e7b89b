"""CubeType pieces that need no kernel: the parameter schema's restriction,
the parameters' layout and C names, spec.config's validation (naming the
field), the values' encoding, the wrapper, and the mapping of BCC's and
the verifier's messages (real outputs, captured from BCC 0.x on kernel 6.12
with the wrapper of this commit) back to the lines of the user's source."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pcn_agent.dataplane.cubes.custom import Wrapped, compile_errors, verifier_errors, wrap
from pcn_crds import FUNCTION_TYPES, CubeType, NetworkFunction
from pcn_crds.cubetype import (
    MAX_PARAMS,
    RESERVED_NAMES,
    SchemaError,
    c_defines,
    config_errors,
    config_values,
    encode,
    param_layout,
    upper_snake,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SCHEMA = {
    "type": "object", "required": ["dscp"],
    "properties": {
        "dscp": {"type": "integer", "minimum": 0, "maximum": 63, "description": "DSCP"},
        "protocol": {"type": "string", "enum": ["any", "tcp", "udp"], "default": "any"},
        "destination": {"type": "string", "format": "ipv4"},
        "strict": {"type": "boolean", "default": True},
        "offset": {"type": "integer", "minimum": -5, "maximum": 5},
    }}

# BCC's output for this source (user lines 4 and 5 were lines 722 and 723 of
# the wrapped text: the wrapper put the source's first line at line 719)
COMPILE_SOURCE = """static int pcn_cube_handle(struct __sk_buff *skb, struct pcn_cube_ctx *ctx)
{
    u32 n = pcn_cube_param(ctx, PCN_PARAM_LIMIT);
    if (n > missing)
        return pcn_cube_drop(ctx)
    return pcn_cube_pass(ctx);
}
"""
COMPILE_OUTPUT = "/virtual/main.c:722:13: error: use of undeclared identifier 'missing'\n    if (n > missing)\n            ^\n/virtual/main.c:723:34: error: expected ';' after return statement\n        return pcn_cube_drop(ctx)\n                                 ^\n                                 ;\n2 errors generated.\n"
# The verifier's log for this source: BCC's rewritten text has 51 lines more
# above it than the wrapped text (main.c:773 is the user's line 4).
VERIFY_SOURCE = """static int pcn_cube_handle(struct __sk_buff *skb, struct pcn_cube_ctx *ctx)
{
    u8 *p = (u8 *)(long)skb->data;
    if (p[40] == 1)
        return pcn_cube_drop(ctx);
    return pcn_cube_pass(ctx);
}
"""
VERIFY_OUTPUT = (
    'bpf: Failed to load program: Permission denied\n'
    '0: R1=ctx() R10=fp0\n'
    '; int pcn_cube_rx(struct __sk_buff *skb) @ main.c:779\n'
    '0: (bf) r6 = r1                       ; R1=ctx() R6=ctx()\n'
    '1: (b7) r1 = 0                        ; R1=0\n'
    '; struct pcn_cube_ctx ctx = {}; @ main.c:782\n'
    '2: (7b) *(u64 *)(r10 -24) = r1        ; R1=0 R10=fp0 fp-24=0\n'
    '3: (7b) *(u64 *)(r10 -32) = r1        ; R1=0 R10=fp0 fp-32=0\n'
    '4: (7b) *(u64 *)(r10 -40) = r1        ; R1=0 R10=fp0 fp-40=0\n'
    '; static __always_inline u32 pcn_meta_instance(struct __sk_buff *skb) { return PCN_META_LOAD(2); } @ main.c:264\n'
    '5: (61) r1 = *(u32 *)(r6 +56)         ; R1=scalar(smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) R6=ctx()\n'
    '; ctx.instance = pcn_meta_instance(skb); @ main.c:783\n'
    '6: (63) *(u32 *)(r10 -40) = r1        ; R1=scalar(id=1,smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) R10=fp0 fp-40=mmmmscalar(id=1,smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff))\n'
    '; ctx.params = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, -6), &ctx.instance); @ main.c:784\n'
    '7: (18) r1 = 0xffff8881027a8800       ; R1=map_ptr(map=pcn_cube_params,ks=4,vs=128)\n'
    '9: (bf) r2 = r10                      ; R2=fp0 R10=fp0\n'
    ';  @ main.c:0\n'
    '10: (07) r2 += -40                    ; R2=fp-40\n'
    '; ctx.params = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, -6), &ctx.instance); @ main.c:784\n'
    '11: (85) call bpf_map_lookup_elem#1   ; R0=map_value_or_null(id=2,map=pcn_cube_params,ks=4,vs=128)\n'
    '12: (7b) *(u64 *)(r10 -24) = r0       ; R0=map_value_or_null(id=2,map=pcn_cube_params,ks=4,vs=128) R10=fp0 fp-24=map_value_or_null(id=2,map=pcn_cube_params,ks=4,vs=128)\n'
    '; if (!ctx.params) @ main.c:785\n'
    '13: (55) if r0 != 0x0 goto pc+33 47: R0=map_value(map=pcn_cube_params,ks=4,vs=128) R6=ctx() R10=fp0 fp-24=map_value(map=pcn_cube_params,ks=4,vs=128) fp-32=0 fp-40=mmmmscalar(id=1,smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff))\n'
    '; static __always_inline u32 pcn_meta_port(struct __sk_buff *skb) { return PCN_META_LOAD(0); } @ main.c:253\n'
    '47: (61) r1 = *(u32 *)(r6 +48)        ; R1=scalar(smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) R6=ctx()\n'
    '; ctx.port = pcn_meta_port(skb); @ main.c:787\n'
    '48: (63) *(u32 *)(r10 -36) = r1       ; R1=scalar(smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) R10=fp0 fp-40=mmmmmmmm\n'
    '; static __always_inline u32 pcn_meta_hook(struct __sk_buff *skb) { return PCN_META_LOAD(1) & 0xff; } @ main.c:255\n'
    '49: (61) r2 = *(u32 *)(r6 +52)        ; R2=scalar(smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) R6=ctx()\n'
    '50: (57) r2 &= 255                    ; R2=scalar(smin=smin32=0,smax=umax=smax32=umax32=255,var_off=(0x0; 0xff))\n'
    '51: (b7) r1 = 1                       ; R1=1\n'
    '; ctx.direction = pcn_meta_hook(skb) == PCN_HOOK_EGRESS ? PCN_CUBE_TO_POD : PCN_CUBE_FROM_POD; @ main.c:788\n'
    '52: (15) if r2 == 0x1 goto pc+1       ; R2=scalar(smin=smin32=0,smax=umax=smax32=umax32=255,var_off=(0x0; 0xff))\n'
    '53: (b7) r1 = 0                       ; R1=0\n'
    '54: (63) *(u32 *)(r10 -32) = r1       ; R1=0 R10=fp0 fp-32=mmmm0\n'
    '; u8 *p = (u8 *)(long)skb->data; @ main.c:772\n'
    '55: (61) r1 = *(u32 *)(r6 +76)        ; R1=pkt(r=0) R6=ctx()\n'
    '; if (p[40] == 1) @ main.c:773\n'
    '56: (71) r1 = *(u8 *)(r1 +40)\n'
    'invalid access to packet, off=40 size=1, R1(id=0,off=40,r=0)\n'
    'R1 offset is outside of the packet\n'
    'processed 321 insns (limit 1000000) max_states_per_insn 0 total_states 26 peak_states 26 mark_read 0\n'
    '\n'
)


# ----------------------------------------------------------------------------- the schema
def test_the_layout_indexes_parameters_in_order_with_their_c_names() -> None:
    params = param_layout(EXAMPLE_SCHEMA)
    # by name: the API server does not keep the order keys were written in
    assert [(p.name, p.index, p.kind) for p in params] == [
        ("destination", 0, "ipv4"), ("dscp", 1, "integer"), ("offset", 2, "integer"),
        ("protocol", 3, "enum"), ("strict", 4, "boolean")]
    assert params[1].required and not params[0].required
    assert c_defines(params, ["marked", "notIpv4"]).splitlines() == [
        "#define PCN_PARAM_DESTINATION 0", "#define PCN_PARAM_DSCP 1",
        "#define PCN_PARAM_OFFSET 2", "#define PCN_PARAM_PROTOCOL 3",
        "#define PCN_PARAM_PROTOCOL_ANY 0", "#define PCN_PARAM_PROTOCOL_TCP 1",
        "#define PCN_PARAM_PROTOCOL_UDP 2", "#define PCN_PARAM_STRICT 4",
        "#define PCN_COUNTER_MARKED 0", "#define PCN_COUNTER_NOT_IPV4 1"]
    assert param_layout({**EXAMPLE_SCHEMA, "properties": dict(reversed(
        EXAMPLE_SCHEMA["properties"].items()))}) == params
    assert upper_snake("onlyToHost2") == "ONLY_TO_HOST2"
    assert params[1].describe() == "integer 0..63 (required): DSCP"
    assert params[3].describe() == "one of any|tcp|udp (default any)"


@pytest.mark.parametrize("schema,error", [
    ({"type": "object", "properties": {"x": {"type": "string", "pattern": "^a"}}},
     "parameters.properties.x: a string needs exactly one of enum or format: ipv4"),
    ({"type": "object", "properties": {"x": {"type": "string", "format": "ipv4",
                                              "pattern": "^a"}}},
     "parameters.properties.x.pattern: not supported for a string"),
    ({"type": "object", "properties": {"x": {"type": "object", "properties": {}}}},
     "parameters.properties.x.type: 'object' is not supported"),
    ({"type": "object", "properties": {"x": {"type": "array", "items": {"type": "integer"}}}},
     "parameters.properties.x.type: 'array' is not supported"),
    ({"type": "object", "properties": {"x": {"type": "number"}}},
     "parameters.properties.x.type: 'number' is not supported"),
    ({"type": "object", "properties": {"x": {"type": "integer", "minimum": 0}}},
     "parameters.properties.x.maximum: required, an integer"),
    ({"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                              "maximum": 2**64}}},
     "parameters.properties.x.maximum: must lie within"),
    ({"type": "object", "properties": {"x": {"type": "integer", "minimum": 3, "maximum": 1}}},
     "parameters.properties.x: minimum 3 is above maximum 1"),
    ({"type": "object", "properties": {"x": {"type": "string", "format": "email"}}},
     "parameters.properties.x.format: 'email' is not supported (only ipv4)"),
    ({"type": "object", "properties": {"x": {"type": "string", "enum": ["a b"]}}},
     "parameters.properties.x.enum: a list of 1 or more names"),
    ({"type": "object", "properties": {"x": {"type": "boolean", "default": "yes"}}},
     "parameters.properties.x.default: must be a boolean"),
    ({"type": "object", "properties": {"x_y": {"type": "boolean"}}},
     "parameters.properties.x_y: a name is camelCase"),
    ({"type": "object", "properties": {}, "anyOf": []},
     "parameters.anyOf: not supported"),
    ({"type": "object", "properties": {}, "required": ["nope"]},
     "parameters.required: 'nope' is not a property"),
    ({"type": "object", "additionalProperties": True, "properties": {}},
     "parameters.additionalProperties: only false is supported"),
    ({"type": "object", "properties": {f"p{i}": {"type": "boolean"}
                                       for i in range(MAX_PARAMS + 1)}},
     f"parameters.properties: at most {MAX_PARAMS} parameters"),
    ({"type": "object", "properties": {"aB": {"type": "boolean"}, "a": {
        "type": "string", "enum": ["b"]}}},
     "PCN_PARAM_A_B is also"),
], ids=["pattern", "pattern-on-ipv4", "object", "array", "number", "no-maximum", "too-big",
        "min-above-max", "format", "enum-value", "bool-default", "name", "anyOf", "required",
        "additional", "too-many", "define-clash"])
def test_the_restriction_refuses_what_a_map_cannot_carry(schema: dict, error: str) -> None:
    with pytest.raises(SchemaError) as err:
        param_layout(schema)
    assert any(error in e for e in err.value.errors), err.value.errors


def test_reserved_names_cover_every_built_in_type() -> None:
    stems = {p.stem for p in (ROOT / "bpf").glob("*.c")}
    assert stems | set(FUNCTION_TYPES) <= RESERVED_NAMES


def test_the_guide_lists_the_reserved_names() -> None:
    """docs/writing-a-cube.md's list is RESERVED_NAMES (it once lacked
    flowmonitor and packetcapture), in order."""
    text = " ".join((ROOT / "docs" / "writing-a-cube.md").read_text().split())
    listed = re.search(r"\(reserved names: ([a-z0-9_, ]+)\)", text)
    assert listed is not None
    assert listed.group(1).split(", ") == sorted(RESERVED_NAMES)


def test_the_crd_refuses_the_reserved_names() -> None:
    """The API server refuses a CubeType named after a built-in type (a CEL
    rule at the schema's root reads metadata.name; a real API server runs it
    in test_crds_apiserver.py), with the agent's message."""
    from pcn_crds.cubetype import reserved_name_message
    from pcn_crds.generate import crd

    rules = crd(CubeType)["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "x-kubernetes-validations"]
    (rule,) = [r for r in rules if "self.metadata.name in" in r["rule"]]
    names = re.findall(r"'([a-z0-9_]+)'", rule["rule"])
    assert rule["rule"].startswith("!(") and sorted(names) == sorted(RESERVED_NAMES)
    # the message expression, evaluated for one name as CEL would
    parts = re.fullmatch(r"self\.metadata\.name \+ '([^']*)' \+ self\.metadata\.name \+ "
                         r"'([^']*)'", rule["messageExpression"])
    assert parts is not None, rule["messageExpression"]
    assert f"firewall{parts.group(1)}firewall{parts.group(2)}" == \
        reserved_name_message("firewall")


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config,error", [
    ({}, "spec.config.dscp: required"),
    ({"dscp": 64}, "spec.config.dscp: 64 is greater than the maximum of 63"),
    ({"dscp": "46"}, "spec.config.dscp: '46' is not of type 'integer'"),
    ({"dscp": 1, "protocol": "icmp"}, "spec.config.protocol: 'icmp' is not one of"),
    ({"dscp": 1, "destination": "10.0.0.300"}, "spec.config.destination: '10.0.0.300' is not a"),
    ({"dscp": 1, "strict": "true"}, "spec.config.strict: 'true' is not of type 'boolean'"),
    ({"dscp": 1, "dcsp": 2}, "spec.config.dcsp: not a parameter of this type"),
])
def test_config_errors_name_the_field(config: dict, error: str) -> None:
    errors = config_errors(param_layout(EXAMPLE_SCHEMA), config)
    assert any(e.startswith(error) for e in errors), errors


def test_values_take_defaults_and_encode_as_the_program_reads_them() -> None:
    params = param_layout(EXAMPLE_SCHEMA)
    assert config_errors(params, {"dscp": 46, "offset": -2}) == []
    values = config_values(params, {"dscp": 46, "offset": -2})
    assert values == (("destination", "0.0.0.0"), ("dscp", 46), ("offset", -2),
                      ("protocol", "any"), ("strict", True))
    words = encode(params, config_values(params, {"dscp": 46, "protocol": "udp",
                                                  "destination": "10.1.2.3", "offset": -2}))
    # the address as the packet holds it: bytes 10 1 2 3 in memory
    assert words[0].to_bytes(4, sys.byteorder) == bytes([10, 1, 2, 3])
    assert words[1:] == [46, 2**64 - 2, 2, 1]
    with pytest.raises(ValueError, match="dscp: 99 is not an integer in 0..63"):
        encode(params, values[:1] + (("dscp", 99),) + values[2:])
    with pytest.raises(ValueError, match="destination: None is not an IPv4 address"):
        encode(params, values[1:])


# ----------------------------------------------------------------------------- models
def test_the_models_take_cubetypes_and_functions_of_them() -> None:
    ct = CubeType.model_validate({"kind": "CubeType", "metadata": {"name": "dscp-marker"},
                                  "spec": {"source": "x", "parameters": EXAMPLE_SCHEMA,
                                           "counters": ["marked"], "defaultHook": "egress"}})
    assert ct.spec.defaultHook == "egress"
    with pytest.raises(ValidationError, match="camelCase"):
        CubeType.model_validate({"kind": "CubeType", "spec": {"source": "x",
                                                              "counters": ["not-camel"]}})
    nf = NetworkFunction.model_validate({"kind": "NetworkFunction", "spec": {
        "type": "dscp-marker", "config": {"dscp": 46}}})
    assert not nf.spec.is_builtin() and nf.spec.config == {"dscp": 46}
    with pytest.raises(ValidationError, match="String should match pattern"):
        NetworkFunction.model_validate({"kind": "NetworkFunction", "spec": {"type": "Nat!"}})


# ----------------------------------------------------------------------------- errors
def test_the_wrapper_keeps_the_source_as_given_at_first_line() -> None:
    params = param_layout(EXAMPLE_SCHEMA)
    w = wrap(VERIFY_SOURCE, params, ["marked"])
    lines = w.text.splitlines()
    assert lines[w.first_line - 1:w.first_line - 1 + w.lines] == VERIFY_SOURCE.splitlines()
    assert "#define PCN_PARAM_DSCP 1" in lines[:w.first_line]
    assert w.user_line(w.first_line) == 1 and w.user_line(w.first_line - 1) is None
    assert w.user_line(w.first_line + w.lines) is None


def test_compile_errors_map_to_the_users_lines() -> None:
    w = Wrapped("", 719, 7)
    diags = compile_errors(COMPILE_OUTPUT, w)
    assert [(d.line, d.column, d.message) for d in diags] == [
        (4, 13, "use of undeclared identifier 'missing'"),
        (5, 34, "expected ';' after return statement")]
    outside = compile_errors("/virtual/main.c:900:5: error: use of undeclared identifier "
                             "'pcn_cube_handle'\n1 error generated.\n", w)
    assert outside[0].line is None and "does the source define" in outside[0].message
    assert compile_errors("something else broke\n", w)[0].message == "something else broke"


def test_verifier_errors_map_to_the_users_lines() -> None:
    w = wrap(VERIFY_SOURCE, (), [])
    d = verifier_errors(VERIFY_OUTPUT, w)[0]
    assert (d.stage, d.line) == ("verify", 4)
    assert d.message.startswith("invalid access to packet, off=40 size=1")
    assert "processed" not in d.message and "Permission denied" not in d.message


def test_an_absent_integer_reads_as_its_minimum_when_zero_is_out_of_range() -> None:
    params = param_layout({"type": "object", "properties": {
        "ttl": {"type": "integer", "minimum": 1, "maximum": 255},
        "delta": {"type": "integer", "minimum": -3, "maximum": 3}}})
    values = config_values(params, {})
    assert values == (("delta", 0), ("ttl", 1))
    assert encode(params, values) == [0, 1]
