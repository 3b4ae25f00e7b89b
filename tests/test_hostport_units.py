"""hostPorts (the CNI portMappings capability) without a kernel: pcn-cni's
parsing of runtimeConfig.portMappings, the local API's check of what it
forwards, and the lab kubelet's mappings from a pod spec (as kubelet and
containerd build them)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pcn_agent.cni import spec
from pcn_agent.control.localapi import ApiError, _port_mappings
from pcn_lab import kubelet

CONF = {"cniVersion": "1.0.0", "name": "pcn", "type": "pcn",
        "capabilities": {"portMappings": True}, "ipam": {"type": "host-local"}}


def _conf(runtime_config: Any) -> bytes:
    return json.dumps({**CONF, "runtimeConfig": runtime_config}).encode()


def test_port_mappings_are_parsed_as_the_runtime_sends_them() -> None:
    net = spec.parse_conf(_conf({"portMappings": [
        {"hostPort": 54323, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"},
        {"hostPort": 54323, "containerPort": 8080, "protocol": "UDP", "hostIP": "10.0.0.5"},
        {"hostPort": 8000, "containerPort": 80},  # protocol and hostIP left out
        {"hostPort": 8001, "containerPort": 80, "protocol": "tcp", "hostIP": "fd00::1"},
    ]}))
    assert net.port_mappings == [
        {"hostPort": 54323, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"},
        {"hostPort": 54323, "containerPort": 8080, "protocol": "udp", "hostIP": "10.0.0.5"},
        {"hostPort": 8000, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
    ]  # the IPv6 one is left out: pcn is IPv4 only
    assert spec.parse_conf(json.dumps(CONF).encode()).port_mappings == []
    # containerd 2.4 (go-cni) sends the Go field names: read without case, as
    # the reference portmap plugin's encoding/json does (the first real
    # cluster's HostPort conformance test failed on exactly this)
    assert spec.parse_conf(_conf({"portMappings": [
        {"HostPort": 54323, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": "127.0.0.1"},
    ]})).port_mappings == [
        {"hostPort": 54323, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"}]
    assert spec.parse_conf(_conf({"portMappings": []})).port_mappings == []


@pytest.mark.parametrize("mappings,words", [
    ({"hostPort": 1}, "must be a list"),
    ([{"hostPort": 0, "containerPort": 80}], "1 to 65535"),
    ([{"hostPort": 80, "containerPort": 70000}], "1 to 65535"),
    ([{"hostPort": "80", "containerPort": 80}], "1 to 65535"),
    ([{"hostPort": 80, "containerPort": 80, "protocol": "sctp"}], "'sctp' is not supported"),
    ([{"hostPort": 80, "containerPort": 80, "hostIP": "node-1"}], "is not an IP address"),
    (["80:80"], "is not an object"),
])
def test_bad_port_mappings_are_invalid_config(mappings: Any, words: str) -> None:
    with pytest.raises(spec.CniError) as err:
        spec.parse_conf(_conf({"portMappings": mappings}))
    assert err.value.code == spec.INVALID_CONFIG
    assert words in err.value.msg


def test_the_local_api_checks_what_the_plugin_forwards() -> None:
    assert _port_mappings({}) == []
    assert _port_mappings({"port_mappings": [
        {"hostPort": 80, "containerPort": 8080, "protocol": "UDP", "hostIP": None}]}) == \
        [{"hostPort": 80, "containerPort": 8080, "protocol": "udp", "hostIP": ""}]
    for bad in ("80", [{"hostPort": True, "containerPort": 80}], [[80, 80]]):
        with pytest.raises(ApiError):
            _port_mappings({"port_mappings": bad})


def test_the_lab_kubelet_passes_host_ports_as_containerd_does() -> None:
    pod = {"spec": {"containers": [
        {"name": "a", "ports": [
            {"containerPort": 8080, "hostPort": 54323, "protocol": "TCP", "hostIP": "127.0.0.1"},
            {"containerPort": 9090},  # no hostPort: not mapped
        ]},
        {"name": "b", "ports": [{"containerPort": 53, "hostPort": 5353, "protocol": "UDP"}]},
    ]}}
    mappings = kubelet.port_mappings(pod)
    assert mappings == [  # go-cni's field names, as containerd 2.4 sends them
        {"HostPort": 54323, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": "127.0.0.1"},
        {"HostPort": 5353, "ContainerPort": 53, "Protocol": "udp", "HostIP": ""},
    ]
    normalised = [
        {"hostPort": 54323, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"},
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": ""},
    ]
    config = kubelet.network_config("10.244.1.0/24", "10.244.1.1", "/run/pcn.sock", "/tmp/x",
                                    1450)
    assert config["capabilities"] == {"portMappings": True}
    with_rc = kubelet.with_capabilities(config, mappings)
    assert with_rc["runtimeConfig"] == {"portMappings": mappings}
    assert spec.parse_conf(json.dumps(with_rc).encode()).port_mappings == normalised
    assert "runtimeConfig" not in kubelet.with_capabilities(config, [])
    plain = {k: v for k, v in config.items() if k != "capabilities"}
    assert "runtimeConfig" not in kubelet.with_capabilities(plain, mappings)  # as libcni


def test_the_localnet_exemption_is_exactly_the_loopback_host_ports() -> None:
    from pcn_agent.node import localnet

    text = localnet.restore_input([("tcp", 54323), ("udp", 53), ("tcp", 54323)])
    rules = [line for line in text.splitlines() if line.startswith("-A")]
    assert text.startswith("*filter\n:PCN-LOCALNET-HOSTPORTS - [0:0]\n") and text.endswith("COMMIT\n")
    assert rules == [
        '-A PCN-LOCALNET-HOSTPORTS -d 127.0.0.0/8 -p tcp -m tcp --dport 54323 -m comment '
        '--comment "pcn hostPort on loopback" -j ACCEPT',
        '-A PCN-LOCALNET-HOSTPORTS -d 127.0.0.0/8 -p udp -m udp --dport 53 -m comment '
        '--comment "pcn hostPort on loopback" -j ACCEPT']
    assert [line for line in localnet.restore_input([]).splitlines() if line.startswith("-A")] == []
    with pytest.raises(ValueError):
        localnet.restore_input([("sctp", 80)])
