"""The deployment manifests (manifests/), checked without a cluster.

Pure Python where possible: YAML, the kustomization tree (resolved here, not by
kustomize), every object's fields against the Kubernetes API models of the
`kubernetes` client, RBAC against what operator/pcn_agent/control/agent.py does, the
DaemonSet's mounts and environment, the ConfigMap through ClusterSettings, the
CNI bundle and installer (built and run for real, the plugin answering
VERSION through the host launcher), the Argo CD health check run by a Lua
interpreter. `kubectl kustomize` is used as an extra check when installed.
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml

from pcn_agent.control.settings import ClusterSettings
from pcn_agent.dataplane.cubes.lbrp import LbSizes
from pcn_agent.dataplane.sessions import SessionTimeouts

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
CRDS = ROOT / "crds"
AGENT_PY = ROOT / "operator" / "pcn_agent" / "control" / "agent.py"
NAMESPACE = "pcn-system"
KINDS = ("NetworkFunction", "CubeChain", "NodePortRule", "CubeType")

# What the agent needs from the API, mirroring operator/pcn_agent/control/agent.py
# (kopf watches: list+watch, plus get; status patches; derived NodePortRules
# created and deleted; Events posted by kube.event and kopf) and kopf itself
# (a CRD watch, so that kinds whose CRD appears after start-up are served).
# `get nodes` is also the install-cni init container's read of spec.podCIDR.
EXPECTED_RBAC: dict[tuple[str, str], set[str]] = {
    ("", "nodes"): {"get", "list", "watch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "services"): {"get", "list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("pcn.dev", "networkfunctions"): {"get", "list", "watch"},
    ("pcn.dev", "cubechains"): {"get", "list", "watch"},
    ("pcn.dev", "nodeportrules"): {"get", "list", "watch", "create", "delete"},
    ("pcn.dev", "networkfunctions/status"): {"patch"},
    ("pcn.dev", "cubechains/status"): {"patch"},
    ("pcn.dev", "nodeportrules/status"): {"patch"},
    ("pcn.dev", "cubetypes"): {"get", "list", "watch"},
    ("pcn.dev", "cubetypes/status"): {"patch"},
    ("", "events"): {"create"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
# For the policy controller (issue 11): NetworkPolicies, the Namespaces their
# selectors match, ClusterNetworkPolicies (the network-policy-api CRD the
# kustomization installs) and their status. Granted ahead of agent.py's
# watches, so exempt from the "unused by agent.py" check until it has them.
POLICY_RBAC: dict[tuple[str, str], set[str]] = {
    ("networking.k8s.io", "networkpolicies"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
    ("policy.networking.k8s.io", "clusternetworkpolicies"): {"list", "watch"},
    ("policy.networking.k8s.io", "clusternetworkpolicies/status"): {"patch"},
}
EXPECTED_RBAC.update(POLICY_RBAC)
# In pcn-system only (a Role): the per-node status ConfigMap (Agent.publish_status).
EXPECTED_NAMESPACED_RBAC: dict[tuple[str, str], set[str]] = {
    ("", "configmaps"): {"create", "patch"},
}
# Raw `self.kube.request(METHOD, ...)` calls in agent.py, by enclosing function:
# what they touch (the path is built at run time, so it is named here).
RAW_REQUESTS: dict[tuple[str, str], tuple[str, str]] = {
    ("publish_status", "PATCH"): ("", "configmaps"),
}
API_PATHS = {"GROUP_PATH": "pcn.dev", "/api/v1": ""}
NETWORK_POLICY_API_URL = ("https://github.com/kubernetes-sigs/network-policy-api/config/crd/"
                          "standard?ref=v0.3.0")


# ---------------------------------------------------------------- helpers
def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization directory produces (resources only; pcn's
    kustomizations use no generators or patches: checked here). Remote
    resources (URLs) are left out: test_network_policy_api_crd_is_the_pinned_one
    checks the one there is."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kust) - {"apiVersion", "kind", "resources", "images"}
    assert not unsupported, f"{directory}/kustomization.yaml uses {unsupported}: extend render()"
    out: list[dict[str, Any]] = []
    for entry in kust.get("resources") or []:
        if "://" in entry:
            continue
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory}/kustomization.yaml lists {entry}, which is missing"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), \
                f"{entry} is a directory without kustomization.yaml"
            out += render(target)
        else:
            out += load_docs(target)
    return out


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(MANIFESTS)


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects
             if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"pcn_manifests_{name}",
                                                  MANIFESTS / "cni" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def mounts_of(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> {mount, volume} for one container."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    out = {}
    for m in container.get("volumeMounts") or []:
        assert m["name"] in volumes, f"{container['name']} mounts undeclared volume {m['name']}"
        out[m["mountPath"]] = {"mount": m, "volume": volumes[m["name"]]}
    return out


# ---------------------------------------------------------------- YAML and kustomize
def test_every_yaml_parses() -> None:
    files = sorted([*MANIFESTS.rglob("*.yaml"), *CRDS.glob("*.yaml")])
    assert len(files) >= 10
    for f in files:
        docs = load_docs(f)
        assert docs, f"{f} is empty"
        for d in docs:
            assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), \
                f"{f}: every document needs apiVersion and kind"


def test_kustomization_lists_existing_files_and_crds_via_directory(
        objects: list[dict[str, Any]]) -> None:
    kust = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    resources = kust["resources"]
    assert "../crds" in resources, "the CRDs come in through the ../crds kustomization"
    assert len(resources) == len(set(resources))
    assert not [r for r in resources if r != "../crds" and r.startswith("..")], \
        "only ../crds may point outside manifests/ (kustomize's load restrictor)"
    assert [r for r in resources if "://" in r] == [NETWORK_POLICY_API_URL], \
        "the one remote resource is network-policy-api's standard CRDs"
    crd_kust = yaml.safe_load((CRDS / "kustomization.yaml").read_text())
    generated = sorted(p.name for p in CRDS.glob("pcn.dev_*.yaml"))
    assert sorted(crd_kust["resources"]) == generated, \
        "crds/kustomization.yaml must list every generated CRD file"
    assert len(generated) == 4
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    assert sorted(c["spec"]["names"]["kind"] for c in crds) == sorted(KINDS)
    ids = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids)), "an object is defined twice"
    assert {o["kind"] for o in objects} == {
        "CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole",
        "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap", "DaemonSet"}
    # manifests/ YAML that the kustomization does not list must not be a forgotten resource
    listed = {(MANIFESTS / r).resolve() for r in resources if "://" not in r}
    for f in MANIFESTS.glob("*.yaml"):
        assert f.name == "kustomization.yaml" or f.resolve() in listed, f"{f.name} is not listed"


def test_namespaced_objects_live_in_pcn_system(objects: list[dict[str, Any]]) -> None:
    cluster_scoped = {"CustomResourceDefinition", "Namespace", "ClusterRole",
                      "ClusterRoleBinding"}
    assert one(objects, "Namespace")["metadata"]["name"] == NAMESPACE
    for o in objects:
        ns = o["metadata"].get("namespace")
        if o["kind"] in cluster_scoped:
            assert ns is None, f"{o['kind']} {o['metadata']['name']} is cluster-scoped"
        else:
            assert ns == NAMESPACE, f"{o['kind']} {o['metadata']['name']} not in {NAMESPACE}"


def _offline_manifests(tmp_path: Path) -> Path:
    """manifests/ as the lab installs it (the remote CRD folder from the Go
    module cache); skips naming `make k8s` when the module is not there."""
    from pcn_lab.cluster import install

    try:
        install.offline_kustomization(MANIFESTS, tmp_path / "base")
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}")
    return tmp_path / "base"


def test_network_policy_api_crd_is_the_pinned_one(tmp_path: Path) -> None:
    """The remote resource: sigs.k8s.io/network-policy-api's standard channel at
    netpol.toml's version (kustomize's GitHub form), which the offline lab
    maps to the module `make k8s` downloads; that folder yields exactly the
    ClusterNetworkPolicy CRD, serving policy.networking.k8s.io/v1alpha2,
    cluster-scoped, with the status subresource the RBAC lets the agent patch."""
    from pcn_lab.cluster import install, policyapi

    module, version = policyapi.pin()
    assert module == "sigs.k8s.io/network-policy-api"
    match = install.REMOTE_NETWORK_POLICY_API.fullmatch(NETWORK_POLICY_API_URL)
    assert match is not None and match["ref"] == version
    assert match["path"] == "config/crd/standard"
    base = _offline_manifests(tmp_path)
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    (crd_dir,) = [r for r in kust["resources"] if "network-policy-api" in r]
    upstream = (base / crd_dir).resolve()  # its kustomization only teaches kustomize names
    listed = yaml.safe_load((upstream / "kustomization.yaml").read_text())["resources"]
    (crd,) = [d for f in listed for d in load_docs(upstream / f)]
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "clusternetworkpolicies.policy.networking.k8s.io"
    assert crd["spec"]["scope"] == "Cluster"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert "v1alpha2" in served
    assert all(v.get("subresources", {}).get("status") == {} for v in served.values())
    assert crd["metadata"]["annotations"]["policy.networking.k8s.io/bundle-version"] == version
    granted_groups = {g for g, r in POLICY_RBAC if r.startswith("clusternetworkpolicies")}
    assert granted_groups == {crd["spec"]["group"]}


def test_kubectl_kustomize_agrees(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the pure-Python kustomization checks still ran")
    base = _offline_manifests(tmp_path)  # offline, as the lab installs it
    out = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    key = lambda o: (o["kind"], o["metadata"].get("namespace") or "", o["metadata"]["name"])  # noqa: E731
    cnp = ("CustomResourceDefinition", "", "clusternetworkpolicies.policy.networking.k8s.io")
    assert sorted(map(key, built)) == sorted([*map(key, objects), cnp])
    images = {c["image"] for o in built if o["kind"] == "DaemonSet"
              for c in [*o["spec"]["template"]["spec"]["initContainers"],
                        *o["spec"]["template"]["spec"]["containers"]]}
    kust = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    img = kust["images"][0]
    assert images == {f"{img['newName']}:{img['newTag']}"}


# ---------------------------------------------------------------- API schema
def _check_model(value: Any, type_name: str, where: str) -> None:
    """Every key of `value` must be a field of the Kubernetes model `type_name`
    (the client ignores unknown fields; the API server prunes or rejects them)."""
    if type_name in ("object", "str", "int", "bool", "float", "datetime", "date"):
        expected = {"str": str, "int": int, "bool": bool, "float": (int, float)}.get(type_name)
        if expected is not None:
            assert isinstance(value, expected) and not (
                expected is int and isinstance(value, bool)), \
                f"{where}: {value!r} is not a {type_name}"
        return
    if m := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            _check_model(item, m.group(1), f"{where}[{i}]")
        return
    if m := re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name):
        assert isinstance(value, dict), f"{where}: expected a mapping"
        for k, item in value.items():
            _check_model(item, m.group(1) or m.group(2), f"{where}.{k}")
        return
    model = getattr(k8s, type_name)
    assert isinstance(value, dict), f"{where}: expected a {type_name} mapping"
    by_json = {j: p for p, j in model.attribute_map.items()}
    for k, item in value.items():
        assert k in by_json, f"{where}: {type_name} has no field {k!r}"
        _check_model(item, model.openapi_types[by_json[k]], f"{where}.{k}")


def test_objects_match_the_kubernetes_api_models(objects: list[dict[str, Any]]) -> None:
    for o in objects:
        version = o["apiVersion"].split("/")[-1].capitalize()
        _check_model(o, f"{version}{o['kind']}", f"{o['kind']}/{o['metadata']['name']}")
    patch = load_docs(MANIFESTS / "argocd" / "argocd-cm-patch.yaml")[0]
    _check_model(patch, "V1ConfigMap", "argocd-cm-patch")


# ---------------------------------------------------------------- RBAC
def granted(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, \
            f"unexpected rule fields {set(rule)} (resourceNames? nonResourceURLs?)"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_grants_exactly_what_the_agent_needs(objects: list[dict[str, Any]]) -> None:
    sa = one(objects, "ServiceAccount", "pcn-agent")
    subject = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    for kind, expected in (("ClusterRole", EXPECTED_RBAC), ("Role", EXPECTED_NAMESPACED_RBAC)):
        role = one(objects, kind, "pcn-agent")
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert not [v for v in rule[field] if "*" in v], f"wildcard in {field}: {rule}"
        assert granted(role) == expected, kind
        binding = one(objects, f"{kind}Binding", "pcn-agent")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": kind, "name": "pcn-agent"}
        assert binding["subjects"] == [subject]
    assert one(objects, "Role")["metadata"]["namespace"] == NAMESPACE
    pod = one(objects, "DaemonSet", "pcn-agent")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "pcn-agent"
    (agent,) = [c for c in pod["containers"] if c["name"] == "agent"]
    # the agent writes its status ConfigMap where the Role allows it: its own namespace
    assert env_of(agent)["PCN_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def _agent_needs() -> dict[tuple[str, str], set[str]]:
    """What agent.py's source asks of the API: kopf watches, status patches of
    its KINDS, creates/deletes through Kube, raw requests, Events."""
    tree = ast.parse(AGENT_PY.read_text())
    needs: dict[tuple[str, str], set[str]] = {}

    def add(group: str, resource: str, *verbs: str) -> None:
        needs.setdefault((group, resource), set()).update(verbs)

    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                            ast.AsyncFunctionDef))]
    enclosing = {id(c): fn.name for fn in functions for c in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            on_kube = ast.unparse(f.value) in ("self.kube", "agent.kube", "AGENT.kube")
            if ast.unparse(f) == "kopf.on.event" and len(args) == 3:
                add(args[0], args[2], "list", "watch")
            elif on_kube and f.attr in ("create", "delete"):
                api, plural = (ast.unparse(a).strip("'\"") for a in node.args[:2])
                assert api in API_PATHS, f"{ast.unparse(node)}: unknown API path {api}"
                add(API_PATHS[api], plural, f.attr)
            elif on_kube and f.attr == "patch_status" and \
                    isinstance(node.args[1], ast.Constant):  # a literal plural (CubeTypes)
                add(API_PATHS[ast.unparse(node.args[0])], f"{node.args[1].value}/status", "patch")
            elif on_kube and f.attr == "event":
                add("", "events", "create")
            elif on_kube and f.attr == "request":
                where = (enclosing.get(id(node), "?"), str(args[0]) if args else "?")
                assert where in RAW_REQUESTS, \
                    f"agent.py makes a raw {where[1]} request in {where[0]}(): name what it " \
                    f"touches in RAW_REQUESTS and grant it in rbac.yaml"
                add(*RAW_REQUESTS[where], where[1].lower())
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["WATCHED"]:
            # the kinds the agent lists and watches itself (control/watch.py)
            for _, _, path in ast.literal_eval(ast.unparse(node.value)):
                parts = path.strip("/").split("/")  # api/v1/R or apis/GROUP/VERSION/R
                add("" if parts[0] == "api" else parts[1], parts[-1], "list", "watch")
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["KINDS"]:
            kinds = ast.literal_eval(ast.unparse(node.value).replace("GROUP_PATH", "None"))
            for _, plural, _ in kinds.values():
                add("pcn.dev", f"{plural}/status", "patch")
    return needs


def test_rbac_covers_what_agent_py_does(objects: list[dict[str, Any]]) -> None:
    needs = _agent_needs()
    watched = {k for k, v in needs.items() if "watch" in v}
    assert len(watched) >= 7, f"found only {sorted(watched)} kopf watches in agent.py"
    assert any(r.endswith("/status") for _, r in needs), "no status patches found in agent.py"
    expected = {**EXPECTED_RBAC, **EXPECTED_NAMESPACED_RBAC}
    have = granted(one(objects, "ClusterRole", "pcn-agent"))
    for key, verbs in granted(one(objects, "Role", "pcn-agent")).items():
        have.setdefault(key, set()).update(verbs)
    for key, verbs in needs.items():
        assert verbs <= have.get(key, set()), \
            f"agent.py needs {sorted(verbs)} on {key}; rbac.yaml grants {have.get(key)}"
        assert verbs <= expected.get(key, set()), f"the EXPECTED lists lag agent.py at {key}"
    # and nothing the agent stopped using lingers (get, and kopf's CRD watch, aside)
    for key, verbs in expected.items():
        if key in POLICY_RBAC and not needs.get(key):
            continue  # granted ahead of the policy controller's watches (issue 11)
        if key != ("apiextensions.k8s.io", "customresourcedefinitions"):
            assert verbs - {"get"} <= needs.get(key, set()), \
                f"granted {sorted(verbs - needs.get(key, set()))} on {key}, unused by agent.py"


# ---------------------------------------------------------------- DaemonSet
@pytest.fixture(scope="module")
def ds(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "DaemonSet", "pcn-agent")


def _containers(ds: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    pod = ds["spec"]["template"]["spec"]
    (agent,) = [c for c in pod["containers"] if c["name"] == "agent"]
    (init,) = [c for c in pod["initContainers"] if c["name"] == "install-cni"]
    return pod, agent, init


def test_daemonset_runs_privileged_on_the_host_network_everywhere(ds: dict[str, Any]) -> None:
    pod, agent, init = _containers(ds)
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert agent["securityContext"]["privileged"] is True
    assert {"operator": "Exists"} in pod["tolerations"], \
        "must tolerate every taint (control plane, not-ready, ...)"
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1}}
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for c in (agent, init):
        assert set(c["resources"]["requests"]) == {"cpu", "memory"}
        assert c["image"] == agent["image"], "the init container uses the agent's image"


def test_daemonset_environment(ds: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    pod, agent, init = _containers(ds)
    for c in (agent, init):
        env = env_of(c)
        assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        mounts = mounts_of(pod, c)
        cfg = mounts[env["PCN_CONFIG"]]
        assert cfg["volume"]["configMap"]["name"] == \
            one(objects, "ConfigMap")["metadata"]["name"] == "pcn-config"
        assert cfg["mount"].get("readOnly") is True
        assert "subPath" not in cfg["mount"], "a directory mount follows ConfigMap updates"
    assert env_of(init)["PCN_SOCKET"] == env_of(agent)["PCN_SOCKET"]


def test_daemonset_mounts_what_bcc_bpffs_and_the_cni_need(ds: dict[str, Any]) -> None:
    pod, agent, init = _containers(ds)
    env = env_of(agent)
    mounts = mounts_of(pod, agent)

    def host(path: str, where: dict[str, dict[str, Any]] = mounts) -> dict[str, Any]:
        assert path in where, f"nothing mounted at {path}"
        return where[path]

    bpf = host("/sys/fs/bpf")
    assert bpf["volume"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert bpf["mount"]["mountPropagation"] == "Bidirectional"
    assert env["PCN_BPF_ROOT"] == "/sys/fs/bpf/pcn"
    for path in ("/lib/modules", "/usr/src"):  # kernel headers for BCC
        m = host(path)
        assert m["volume"]["hostPath"]["path"] == path and m["mount"]["readOnly"] is True
    run = host("/run/pcn")
    assert run["volume"]["hostPath"]["path"] == "/run/pcn"
    for var in ("PCN_SOCKET", "PCN_STATE_DIR"):
        assert Path(env[var]).is_relative_to("/run/pcn"), f"{var} must be on the host's /run/pcn"
    # the init container writes the host's CNI directories
    init_mounts = mounts_of(pod, init)
    install = load_script("install")
    for host_path in ("/opt/cni/bin", "/etc/cni/net.d", "/opt/pcn/cni"):
        m = host(f"/host{host_path}", init_mounts)
        assert m["volume"]["hostPath"]["path"] == host_path
        assert not m["mount"].get("readOnly")
    defaults = install.parser().parse_args([])
    assert (str(defaults.host_root), defaults.cni_bin_dir, defaults.cni_conf_dir,
            defaults.bundle_root) == ("/host", "/opt/cni/bin", "/etc/cni/net.d", "/opt/pcn/cni")


def ports_named(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_daemonset_probes_and_metrics(ds: dict[str, Any]) -> None:
    pod, agent, _ = _containers(ds)
    env = env_of(agent)
    live = re.fullmatch(r"http://([\d.]+):(\d+)(/\S*)", env["PCN_LIVENESS"])
    assert live, env["PCN_LIVENESS"]
    host, port, path = live.group(1), int(live.group(2)), live.group(3)
    assert (port, path) == (8081, "/healthz")
    for probe in ("livenessProbe", "startupProbe"):
        get = agent[probe]["httpGet"]
        assert (get["port"], get["path"]) == (port, path)
        # the kubelet probes from the host: it reaches a loopback-only endpoint
        assert get.get("host") == host if host != "0.0.0.0" else "host" not in get
    assert ports_named(agent)["health"] == port
    # readiness follows the data plane (the local API's status), not the process
    assert agent["readinessProbe"]["exec"]["command"] == ["/opt/pcn/venv/bin/pcn-agent",
                                                         "--ready"]
    ports = ports_named(agent)
    assert ports["metrics"] == int(env["PCN_METRICS_PORT"]) == 9090
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == env["PCN_METRICS_PORT"]


def test_init_container_runs_the_installer_the_image_ships(ds: dict[str, Any]) -> None:
    _, _, init = _containers(ds)
    python, script = init["command"]
    dockerfile = (MANIFESTS / "Dockerfile").read_text()
    assert python == "/opt/pcn/venv/bin/python" and "/opt/pcn/venv" in dockerfile
    assert re.search(r"COPY manifests/cni/bundle.py manifests/cni/install.py /opt/pcn/\n",
                     dockerfile)
    assert script == "/opt/pcn/install.py"
    assert "/opt/pcn/bundle.py /opt/pcn/cni-bundle" in dockerfile
    assert str(load_script("install").parser().parse_args([]).bundle) == "/opt/pcn/cni-bundle"


# ---------------------------------------------------------------- ConfigMap
def test_configmap_validates_with_cluster_settings(objects: list[dict[str, Any]],
                                                   tmp_path: Path) -> None:
    data = one(objects, "ConfigMap", "pcn-config")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values are strings"
    # ClusterSettings ignores unknown keys: a misspelt key would silently do nothing
    assert set(data) == set(ClusterSettings.model_fields)
    for k, v in data.items():  # as the kubelet mounts it: one file per key
        (tmp_path / k).write_text(v)
    s = ClusterSettings.load(tmp_path)
    assert s.pod_mtu == 1450  # "auto" with vxlan: room for its 50 bytes on 1500
    assert s.model_dump() == {
        "mtu": None, "serviceClusterIPRange": "10.96.0.0/12",
        "serviceNodePortRange": "30000-32767", "vtepsRange": "10.18.0.0/16",
        "podCIDR": "10.244.0.0/16", "overlay": "vxlan", "snatPortRange": "61000-65535",
        "sessionTimeoutTCPSynSent": 120, "sessionTimeoutTCPSynRecv": 60,
        "sessionTimeoutTCPEstablished": 86400, "sessionTimeoutTCPFinWait": 120,
        "sessionTimeoutTCPCloseWait": 3600, "sessionTimeoutTCPTimeWait": 120,
        "sessionTimeoutTCPClose": 10, "sessionTimeoutUDP": 30, "sessionTimeoutUDPStream": 120,
        "sessionTimeoutICMP": 30, "sessionGCInterval": 10, "socketLB": True,
        "socketLBCgroup": "", "lbServiceMapMax": 131072, "lbBackendMapMax": 1048576}
    assert s.lb_sizes == LbSizes()  # the ConfigMap's sizes are the tables' defaults
    # the ConfigMap's values are the data path's defaults
    assert s.session_timeouts == SessionTimeouts()
    text = (MANIFESTS / "configmap.yaml").read_text()
    for key in data:
        assert re.search(rf"#[^\n]*\n(\s*#[^\n]*\n)*\s+{key}:", text), f"{key} has no comment"


# ---------------------------------------------------------------- Dockerfile
def test_dockerfile() -> None:
    text = (MANIFESTS / "Dockerfile").read_text()
    assert re.search(r"^ARG DEBIAN=debian:12-slim$", text, re.M)
    assert re.findall(r"^FROM \$\{DEBIAN\} AS base$", text, re.M)
    for pkg in ("python3", "python3-venv", "python3-bpfcc", "iproute2",
                "containernetworking-plugins", "ca-certificates"):
        assert re.search(rf"\s{re.escape(pkg)}(\s|$)", text), f"{pkg} is not installed"
    assert text.count("apt-get install") == text.count("--no-install-recommends")
    assert text.count("apt-get update") == text.count("rm -rf /var/lib/apt/lists/*")
    assert text.count("pip install") == text.count("--no-cache-dir")
    assert "/usr/bin/python3 -m venv /opt/pcn/venv" in text
    assert "ln -s /usr/lib/python3/dist-packages/bcc" in text
    assert 'ENTRYPOINT ["/opt/pcn/venv/bin/pcn-agent"]' in text
    ignore = (MANIFESTS / "Dockerfile.dockerignore").read_text()
    copied = set()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for s in src.split():
            assert (ROOT / s).exists(), f"COPY {s}: missing in the build context"
            assert f"!{s}" in ignore or f"!{s}/**" in ignore, f"{s} is excluded by the ignore file"
            copied.add(s)
    # `pip install .` needs every package directory that setup.cfg names
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for line in cfg["options"]["package_dir"].strip().splitlines():
        top = line.split("=")[1].strip().split("/")[0]
        assert top in copied, f"setup.cfg's {line.strip()}: the Dockerfile does not COPY {top}"
    readme = cfg["metadata"].get("long_description", "").removeprefix("file:").strip()
    assert not readme or readme in copied


# ---------------------------------------------------------------- CNI bundle and installer
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The CNI bundle, built from the test's own Python as the image build does."""
    mod = load_script("bundle")
    out = tmp_path_factory.mktemp("image") / "cni-bundle"
    meta = mod.build(out)
    mod.check(out, meta)
    return out, meta


def test_bundle_carries_the_plugin_and_nothing_else_of_the_agent(
        bundle: tuple[Path, dict[str, str]]) -> None:
    site = bundle[0] / "site"
    assert sorted(p.name for p in site.iterdir()) == ["pcn_agent"]
    assert sorted(p.name for p in (site / "pcn_agent").iterdir()
                  if p.name != "__pycache__") == ["__init__.py", "cni"]
    assert (site / "pcn_agent" / "cni" / "rtnl.py").is_file()


@pytest.fixture
def host(tmp_path: Path, objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A fake host file system for the installer, and its arguments."""
    cfg = tmp_path / "config"
    cfg.mkdir()
    for k, v in one(objects, "ConfigMap", "pcn-config")["data"].items():
        (cfg / k).write_text(v)
    dirs = {"bin": tmp_path / "opt/cni/bin", "conf": tmp_path / "etc/cni/net.d",
            "bundles": tmp_path / "opt/pcn/cni"}
    yield {"dirs": dirs, "config": cfg,
           "args": ["--host-root", "/", "--cni-bin-dir", str(dirs["bin"]),
                    "--cni-conf-dir", str(dirs["conf"]), "--bundle-root", str(dirs["bundles"]),
                    "--config", str(cfg), "--socket", "/run/pcn/agent.sock"]}


def _install(host: dict[str, Any], bundle: Path, *extra: str) -> int:
    return load_script("install").main([*host["args"], "--bundle", str(bundle), *extra])


def test_installer_writes_a_valid_cni_config(host: dict[str, Any], ds: dict[str, Any],
                                             bundle: tuple[Path, dict[str, str]]) -> None:
    from pcn_agent.cni.spec import parse_conf

    assert _install(host, bundle[0], "--pod-cidr", "10.244.3.0/24") == 0
    conf = json.loads((host["dirs"]["conf"] / "10-pcn.conflist").read_text())
    assert (conf["cniVersion"], conf["name"]) == ("1.0.0", "pcn")
    (plugin,) = conf["plugins"]
    assert plugin["type"] == "pcn"
    assert plugin["mtu"] == 1450
    # the runtime passes hostPorts (runtimeConfig.portMappings) only to a
    # plugin that declares the capability
    assert plugin["capabilities"] == {"portMappings": True}
    _, agent, _ = _containers(ds)
    assert plugin["agentSocket"] == env_of(agent)["PCN_SOCKET"]
    assert plugin["ipam"] == {"type": "host-local", "ranges": [[{"subnet": "10.244.3.0/24"}]],
                              "routes": [{"dst": "0.0.0.0/0"}]}
    # as libcni hands it to the plugin: the list's cniVersion and name added
    net = parse_conf(json.dumps({"cniVersion": conf["cniVersion"], "name": conf["name"],
                                 **plugin}).encode())
    assert (net.mtu, net.ipam_type) == (1450, "host-local")
    assert bundle[1]["cniPlugins"] == ["host-local", "loopback"]
    for ipam in bundle[1]["cniPlugins"]:  # launchers, as the host has none: they run
        out = subprocess.run([str(host["dirs"]["bin"] / ipam)], input=b'{"cniVersion":"1.0.0"}',
                             env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=30,
                             check=False)
        assert out.returncode == 0 and "1.0.0" in json.loads(out.stdout)["supportedVersions"]


def test_installed_plugin_runs_from_the_host_path(host: dict[str, Any],
                                                  bundle: tuple[Path, dict[str, str]]) -> None:
    """What the runtime executes: the C launcher (static: nothing of the host),
    which execs pcn-python, the Python plugin's script, when no agent takes
    the invocation (none here); an empty environment."""
    assert _install(host, bundle[0], "--pod-cidr", "10.244.3.0/24") == 0
    plugin = host["dirs"]["bin"] / "pcn"
    assert plugin.read_bytes()[:4] == b"\x7fELF" and os.access(plugin, os.X_OK)
    assert plugin.read_bytes() == (bundle[0] / bundle[1]["launcher"]).read_bytes()
    ldd = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    script = host["dirs"]["bin"] / "pcn-python"
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n") and os.access(script, os.X_OK)
    assert f"b={host['dirs']['bundles']}/{bundle[1]['id']}\n" in text
    nowhere = json.dumps({"cniVersion": "1.0.0", "agentSocket": "/nonexistent/pcn.sock"})
    for exe in (plugin, script):
        out = subprocess.run([str(exe)], input=nowhere.encode(), capture_output=True,
                             env={"CNI_COMMAND": "VERSION"}, timeout=30, check=False)
        assert out.returncode == 0, out.stderr.decode() + out.stdout.decode()
        answer = json.loads(out.stdout)
        assert "1.0.0" in answer["supportedVersions"]
        # a CNI error still comes back as CNI error JSON, on stdout, exit 1
        out = subprocess.run([str(exe)], input=b"", capture_output=True, timeout=30,
                             check=False,
                             env={"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "x",
                                  "CNI_IFNAME": "eth0", "CNI_PATH": str(host["dirs"]["bin"])})
        assert out.returncode == 1 and isinstance(json.loads(out.stdout)["code"], int)


def test_installer_is_idempotent_and_prunes_old_bundles(
        host: dict[str, Any], bundle: tuple[Path, dict[str, str]]) -> None:
    src, meta = bundle
    bundles = host["dirs"]["bundles"]
    assert _install(host, src, "--pod-cidr", "10.244.3.0/24") == 0
    assert sorted(p.name for p in bundles.iterdir()) == [meta["id"]]
    # an older image's bundle, which the launcher used, and one older still
    for old in ("0ld", "0lder"):
        shutil.copytree(src, bundles / old)
        meta_old = {**meta, "id": old}
        (bundles / old / "bundle.json").write_text(json.dumps(meta_old))
    (bundles / ".tmp-crashed-1").mkdir()
    bin_dir = host["dirs"]["bin"]
    plugin = bin_dir / "pcn-python"  # the Python plugin's script names the bundle
    for launcher in (plugin, bin_dir / "host-local"):
        launcher.write_text(launcher.read_text().replace(meta["id"], "0ld"))
    (bin_dir / "loopback").write_text("#!/bin/sh\n# the host's own loopback\n")
    assert _install(host, src, "--pod-cidr", "10.244.3.0/24") == 0
    assert sorted(p.name for p in bundles.iterdir()) == sorted(["0ld", meta["id"]])
    for launcher in (plugin, bin_dir / "host-local"):  # ours: moved to the new bundle
        assert f"/{meta['id']}\n" in launcher.read_text()
    assert (bin_dir / "loopback").read_text() == "#!/bin/sh\n# the host's own loopback\n"
    assert _install(host, src, "--pod-cidr", "10.244.3.0/24") == 0
    assert sorted(p.name for p in bundles.iterdir()) == [meta["id"]]


def test_installer_refuses_a_pod_cidr_outside_the_cluster(
        host: dict[str, Any], bundle: tuple[Path, dict[str, str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _install(host, bundle[0], "--pod-cidr", "10.99.0.0/24") == 1
    assert "outside the cluster's 10.244.0.0/16" in capsys.readouterr().err
    assert not (host["dirs"]["conf"] / "10-pcn.conflist").exists()


def test_installer_reads_the_node_pod_cidr_from_the_api(
        host: dict[str, Any], bundle: tuple[Path, dict[str, str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a cluster: NODE_NAME, the API (here a loopback stand-in), waiting
    until the controller manager has given the Node its pod CIDR."""
    seen: list[str] = []

    class Api(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)
            spec = {"podCIDRs": ["fd00::/64", "10.244.7.0/24"]} if len(seen) > 2 else {}
            body = json.dumps({"kind": "Node", "metadata": {"name": "n1"}, "spec": spec})
            self.send_response(200 if self.path == "/api/v1/nodes/n1" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *_: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    install = load_script("install")
    monkeypatch.setattr(install, "RETRY_S", 0.01)
    monkeypatch.setenv("PCN_KUBE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        rc = install.main([*host["args"], "--bundle", str(bundle[0]), "--node", "n1",
                           "--wait", "20"])
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0
    assert seen[:3] == ["/api/v1/nodes/n1"] * 3
    conf = json.loads((host["dirs"]["conf"] / "10-pcn.conflist").read_text())
    assert conf["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.7.0/24"}]]
    assert install.node_pod_cidr({"spec": {"podCIDR": "10.244.9.0/24"}}) == "10.244.9.0/24"
    assert install.node_pod_cidr({"spec": {}}) is None
    ipaddress.IPv4Network(install.node_pod_cidr({"spec": {"podCIDRs": ["10.1.2.0/24"]}}))


# ---------------------------------------------------------------- Argo CD health
def _lua() -> str:
    """Argo CD runs gopher-lua (Lua 5.1): prefer the same language version."""
    for name in ("lua5.1", "luajit", "lua5.3", "lua5.4", "lua"):
        if path := shutil.which(name):
            return path
    pytest.fail("no Lua interpreter: install Debian's lua5.1 (scripts/setup.sh does)")


def _lua_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "{" + ", ".join(_lua_literal(x) for x in v) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"[{_lua_literal(k)}] = {_lua_literal(x)}"
                               for k, x in v.items() if x is not None) + "}"
    raise TypeError(type(v))


def health(obj: dict[str, Any]) -> tuple[str, str]:
    script = (f"obj = {_lua_literal(obj)}\n"
              f"local hs = assert(loadfile({_lua_literal(str(MANIFESTS / 'argocd/health.lua'))}))()\n"
              "io.write(hs.status, '\\n', hs.message or '')\n")
    out = subprocess.run([_lua(), "-"], input=script, capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    status, _, message = out.stdout.partition("\n")
    return status, message


def _obj(generation: int | None, status: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "fw", "namespace": "default"}
    if generation is not None:
        meta["generation"] = generation
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction", "metadata": meta,
            "spec": {"type": "firewall"}, **({"status": status} if status else {})}


def _ready(value: str, reason: str, message: str, gen: int | None = 2) -> dict[str, Any]:
    """A status as the agents write it (agent.py _write_statuses)."""
    cond = {"type": "Ready", "status": value, "reason": reason, "message": message,
            "observedGeneration": gen, "lastTransitionTime": "2025-01-01T00:00:00Z"}
    return {"observedGeneration": gen, "conditions": [cond], "realizedNodes": 2,
            "realizedPods": 3, "nodes": {"n1": {"ready": value == "True", "pods": 3}}}


@pytest.mark.parametrize(("obj", "want", "message"), [
    (_obj(1, None), "Progressing", "Waiting for the pcn agents to report"),
    (_obj(1, {"conditions": []}), "Progressing", "Waiting for the Ready condition"),
    (_obj(1, {"conditions": [{"type": "Other", "status": "True"}]}), "Progressing", ""),
    (_obj(2, _ready("True", "Realized", "realized on 2 node(s)")), "Healthy",
     "realized on 2 node(s)"),
    (_obj(2, _ready("False", "InvalidConfig", "port 0 is not a port")), "Degraded",
     "InvalidConfig: port 0 is not a port"),
    (_obj(2, _ready("False", "NotRealizedEverywhere", "")), "Degraded", "NotRealizedEverywhere"),
    (_obj(3, _ready("True", "Realized", "realized on 2 node(s)")), "Progressing",
     "generation 3 (last seen: 2)"),
    (_obj(3, _ready("False", "InvalidConfig", "old news")), "Progressing", "generation 3"),
    (_obj(None, _ready("True", "Realized", "ok")), "Healthy", "ok"),
    (_obj(2, _ready("True", "Realized", "ok", gen=None)), "Healthy", "ok"),
    (_obj(2, _ready("Unknown", "Pending", "")), "Progressing", "Pending"),
])
def test_argocd_health_check(obj: dict[str, Any], want: str, message: str) -> None:
    status, got = health(obj)
    assert status == want
    assert message in got


def test_argocd_cm_patch_registers_the_health_check_for_every_kind() -> None:
    lua = (MANIFESTS / "argocd" / "health.lua").read_text()
    patch = load_docs(MANIFESTS / "argocd" / "argocd-cm-patch.yaml")[0]
    assert (patch["kind"], patch["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    keys = set()
    for f in CRDS.glob("pcn.dev_*.yaml"):
        crd = load_docs(f)[0]
        keys.add(f"resource.customizations.health.{crd['spec']['group']}_"
                 f"{crd['spec']['names']['kind']}")
    assert set(patch["data"]) == keys
    for key, script in patch["data"].items():
        assert script == lua, f"{key} differs from health.lua: copy health.lua into it"


def test_readme_shows_the_install_command() -> None:
    text = (MANIFESTS / "README.md").read_text()
    assert "kubectl apply -k manifests/" in text
    assert "argocd-cm-patch.yaml" in text and "rollout restart" in text


def test_cni_scripts_run_with_the_project_python() -> None:
    for name in ("bundle", "install"):
        out = subprocess.run([sys.executable, str(MANIFESTS / "cni" / f"{name}.py"), "--help"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0 and "usage:" in out.stdout, out.stderr


def test_only_cluster_admins_write_cubetypes(objects: list[dict[str, Any]]) -> None:
    """A CubeType is C code every node compiles into its data path: no role
    of pcn's grants creating or changing one (cluster-admin's '*' does); the
    agent reads them and patches their status; everyone with view, edit or
    admin in a namespace may read them (aggregated), to write functions."""
    for role in (o for o in objects if o["kind"] in ("ClusterRole", "Role")):
        verbs = granted(role).get(("pcn.dev", "cubetypes"), set())
        assert verbs <= {"get", "list", "watch"}, role["metadata"]["name"]
    viewer = one(objects, "ClusterRole", "pcn-cubetype-viewer")
    assert granted(viewer) == {("pcn.dev", "cubetypes"): {"get", "list", "watch"}}
    labels = viewer["metadata"]["labels"]
    for role in ("view", "edit", "admin"):
        assert labels[f"rbac.authorization.k8s.io/aggregate-to-{role}"] == "true"
    assert granted(one(objects, "ClusterRole", "pcn-agent"))[("pcn.dev", "cubetypes/status")] \
        == {"patch"}
