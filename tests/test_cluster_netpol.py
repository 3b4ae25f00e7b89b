"""`make netpol` (pcn_lab.cluster.netpol, pcn_lab.cluster.policyapi): the
selection file, both suites' command lines, the SCTP-less base manifests and
the results of both (JUnit, test2json events), without a cluster. The checks
against the downloaded network-policy-api module skip, naming `make k8s`,
when it is not in the Go module cache."""

from __future__ import annotations

import errno
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from pcn_lab.cluster import artifacts, build, images, netpol, policyapi
from pcn_lab.cluster import conformance as conf

ROOT = Path(__file__).resolve().parents[1]
PKG = "sigs.k8s.io/network-policy-api/conformance"


def _module() -> Path:
    try:
        return policyapi.module_dir(artifacts.go_mod_cache())
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _short_names(module: Path) -> set[str]:
    text = "".join(p.read_text() for p in (module / "conformance" / "tests").glob("*.go"))
    return set(re.findall(r'ShortName:\s*"([A-Za-z0-9]+)"', text))


# ---------------------------------------------------------------- the selection
def test_the_e2e_selection_is_kube_network_policies_and_skips_sctp_only_without_it() -> None:
    with_sctp = conf.load_selection(netpol.SELECTION_FILE, frozenset())
    without = conf.load_selection(netpol.SELECTION_FILE, frozenset({policyapi.NO_SCTP}))
    assert with_sctp.focus == ("Netpol|NetworkPolicy",)
    sctp_spec = ("[sig-network] Netpol [Feature:SCTPConnectivity] [LinuxOnly] NetworkPolicy "
                 "between server and client using SCTP should enforce policy based on Ports "
                 "[Feature:NetworkPolicy]")
    assert with_sctp.selected(sctp_spec) and with_sctp.skip_reason(sctp_spec) is None
    reason = without.skip_reason(sctp_spec)
    assert reason is not None and "CONFIG_IP_SCTP" in reason
    # a policy naming SCTP, probed over TCP, needs no SCTP in the kernel: never skipped
    tcp_spec = ("[sig-network] Netpol NetworkPolicy between server and client should not "
                "mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin "
                "doesn't support SCTP [Feature:NetworkPolicy]")
    assert without.selected(tcp_spec) and without.skip_reason(tcp_spec) is None
    api_spec = "[sig-network] Netpol API should support creating NetworkPolicy API operations"
    assert without.selected(api_spec)
    assert not without.selected("[sig-network] Services should serve a basic endpoint")


def test_a_skip_with_an_unknown_condition_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "n.toml"
    f.write_text("focus = ['a']\n[[skip]]\npattern = 'x'\nreason = 'r'\nwhen = 'no-ipv6'\n")
    with pytest.raises(conf.SelectionError, match="unknown condition"):
        conf.load_selection(f)


def test_the_api_selection_pins_the_module_and_skips_by_exact_name() -> None:
    api = policyapi.load()
    assert (api.module, api.version) == policyapi.pin() == ("sigs.k8s.io/network-policy-api",
                                                            "v0.3.0")
    # the standard profile and the experimental features pcn implements, whose
    # fields only the experimental CRD has: the lab installs that one
    assert api.features == ("ClusterNetworkPolicy", "ClusterNetworkPolicyNamedPorts",
                            "ClusterNetworkPolicyEgressNodePeers")
    assert api.lab_channel == "experimental"
    assert api.active_skips(frozenset()) == ()
    skipped = {t for s in api.active_skips({policyapi.NO_SCTP}) for t in s.tests}
    assert {"CNPAdminTierIngressSCTP", "CNPBaselineTierEgressSCTP", "CNPAdminTierGress"} <= skipped
    assert "CNPAdminTierIngressTCP" not in skipped


def test_the_api_skips_name_tests_the_suite_has_and_every_sctp_prober() -> None:
    module = _module()
    names = _short_names(module)
    assert len(names) >= 28
    skips = policyapi.load().active_skips({policyapi.NO_SCTP})
    skipped = {t for s in skips for t in s.tests}
    assert skipped <= names
    # every standard test whose code probes SCTP is skipped without SCTP (the
    # experimental ones are skipped by the suite: their features are not claimed)
    for path in (module / "conformance" / "tests").glob("*standard*.go"):
        text = path.read_text()
        (name,) = re.findall(r'ShortName:\s*"([A-Za-z0-9]+)"', text)
        assert ('"sctp"' in text) == (name in skipped), name


@pytest.mark.parametrize("text,match", [
    ("focus = ['a']\n", "no \\[network-policy-api\\]"),
    ("[network-policy-api]\nmodule = 'm'\nversion = '1'\n", "vX.Y.Z"),
    ("[network-policy-api]\nmodule = 'm'\nversion = 'v1.0.0'\ntimeout = 'soon'\n", "duration"),
    ("[network-policy-api]\nmodule = 'm'\nversion = 'v1.0.0'\n"
     "[[network-policy-api.skip]]\ntests = ['A']\n", "reason"),
    ("[network-policy-api]\nmodule = 'm'\nversion = 'v1.0.0'\n"
     "[[network-policy-api.skip]]\ntests = ['A.*']\nreason = 'r'\n", "not test names"),
    ("[network-policy-api]\nmodule = 'm'\nversion = 'v1.0.0'\n"
     "[[network-policy-api.skip]]\ntests = ['A']\nreason = 'r'\nwhen = 'never'\n",
     "unknown condition"),
])
def test_a_bad_api_selection_names_the_fault(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "n.toml"
    f.write_text(text)
    with pytest.raises(conf.SelectionError, match=match):
        policyapi.load(f)


# ---------------------------------------------------------------- the kernel
def test_sctp_support_is_what_a_socket_says(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []

    class Sock:
        def __init__(self, family: int, kind: int, proto: int) -> None:
            calls.append((family, kind, proto))

        def close(self) -> None:
            pass

    monkeypatch.setattr(socket, "socket", Sock)
    assert policyapi.kernel_has_sctp() and policyapi.conditions() == frozenset()
    assert calls[0] == (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)

    def refuse(code: int) -> Any:
        def make(*args: int) -> None:
            raise OSError(code, "no")
        return make

    monkeypatch.setattr(socket, "socket", refuse(errno.EPROTONOSUPPORT))
    assert not policyapi.kernel_has_sctp()
    assert policyapi.conditions() == frozenset({policyapi.NO_SCTP})
    monkeypatch.setattr(socket, "socket", refuse(errno.EMFILE))
    with pytest.raises(OSError):
        policyapi.kernel_has_sctp()


# ---------------------------------------------------------------- the SCTP-less base
BASE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: ns-a
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: a
spec:
  template:
    spec:
      hostNetwork: true
      containers:
        - name: a-client
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
        - name: a-{{ index .HostNetworkPorts 0 }}-tcp
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
          command: ["/bin/bash", "-c", "/agnhost serve-hostname --tcp --port {{ index .HostNetworkPorts 0 }}"]
          ports:
            - containerPort: {{ index .HostNetworkPorts 0 }}
              protocol: TCP
        - name: a-9003
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
          command: ["/bin/bash", "-c", "/agnhost porter"]
          env:
          - name: SERVE_SCTP_PORT_9003
            value: "foo"

        - name: a-53
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
          env:
          - name: X
            value: "1"
      volumes: []
---
apiVersion: v1
kind: Namespace
metadata:
  name: ns-b
"""


def _rendered(text: str) -> list[dict[str, Any]]:
    """The manifests as the suite applies them: the template's one action filled."""
    filled = re.sub(r"\{\{ index \.HostNetworkPorts (\d+) \}\}",
                    lambda m: str(34345 + int(m.group(1))), text)
    return [d for d in yaml.safe_load_all(filled) if d]


def test_the_sctp_servers_go_and_nothing_else_changes() -> None:
    out = policyapi.without_sctp_servers(BASE)
    assert "SERVE_SCTP_PORT_" not in out and "a-9003" not in out
    before, after = _rendered(BASE), _rendered(out)
    assert [d["kind"] for d in after] == [d["kind"] for d in before]
    containers = after[1]["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["a-client", "a-34345-tcp", "a-53"]
    assert containers[1]["ports"] == [{"containerPort": 34345, "protocol": "TCP"}]
    assert after[1]["spec"]["template"]["spec"]["volumes"] == []
    # every other line is kept as it was (the template's text included)
    kept = [ln for ln in BASE.splitlines() if ln not in out.splitlines()]
    assert all("9003" in ln or "porter" in ln or ln.strip() in ("", 'value: "foo"')
               or "agnhost:2.45" in ln or "env:" in ln for ln in kept)


def test_a_base_without_sctp_servers_is_refused() -> None:
    with pytest.raises(ValueError, match="upstream layout changed"):
        policyapi.without_sctp_servers(BASE.replace("SERVE_SCTP_PORT_9003", "SERVE_PORT_9003"))


def test_the_real_base_loses_exactly_its_porter_containers() -> None:
    text = (_module() / policyapi.BASE_MANIFESTS).read_text()
    before, after = _rendered(text), _rendered(policyapi.without_sctp_servers(text))
    for old, new in zip(before, after, strict=True):
        if old["kind"] != "StatefulSet":
            assert old == new
            continue
        old_c = old["spec"]["template"]["spec"]["containers"]
        new_c = new["spec"]["template"]["spec"]["containers"]
        assert [c for c in old_c if "porter" not in " ".join(c.get("command", []))] == new_c
        assert len(old_c) - len(new_c) == 2
    # and the tag it pins is one the lab's agnhost image carries
    tags = set(re.findall(r"agnhost:([\w.\-]+)", text))
    refs = {r for recipe in images.recipes() for r in recipe.refs}
    assert {f"registry.k8s.io/e2e-test-images/agnhost:{t}" for t in tags} <= refs


# ---------------------------------------------------------------- command lines
def test_the_e2e_command_line_is_kube_network_policies(tmp_path: Path) -> None:
    sel = conf.load_selection(netpol.SELECTION_FILE, frozenset({policyapi.NO_SCTP}))
    argv = conf.ginkgo_argv(Path("/c/bin"), sel, tmp_path, Path("/k/admin.conf"))
    sep = argv.index("--")
    assert "--focus=Netpol|NetworkPolicy" in argv[:sep]
    assert r"--skip=\[Feature:SCTPConnectivity\]" in argv[:sep]
    assert "--provider=local" in argv[sep:] and "--num-nodes=2" in argv[sep:]


def test_the_api_command_line_is_upstreams_make_conformance() -> None:
    api = policyapi.load()
    skips = api.active_skips({policyapi.NO_SCTP})
    argv = policyapi.argv(Path("/c/bin"), api, skips, nosctp=True)
    assert argv[:4] == ["/c/bin/test2json", "-t", "-p", PKG]
    assert argv[4] == f"/c/bin/{policyapi.BINARY_NOSCTP}"
    assert "-test.v=test2json" in argv and "-test.run=^TestConformance$" in argv
    assert "-test.timeout=60m" in argv and "-cleanup-base-resources=true" in argv
    assert ("-supported-features=ClusterNetworkPolicy,ClusterNetworkPolicyNamedPorts,"
            "ClusterNetworkPolicyEgressNodePeers") in argv
    (skip,) = [a for a in argv if a.startswith("-test.skip=")]
    assert skip == "-test.skip=" + policyapi.skip_regex(skips)
    plain = policyapi.argv(Path("/c/bin"), api, (), nosctp=False, only="CNPAdminTierIngressTCP")
    assert plain[4] == f"/c/bin/{policyapi.BINARY}"
    assert "-test.run=^TestConformance$/(CNPAdminTierIngressTCP)" in plain
    # Go splits -test.run at each top-level "|" (testing's splitRegexp):
    # unbracketed, A|B|C would keep only A under TestConformance
    several = policyapi.argv(Path("/c/bin"), api, (), nosctp=False, only="A|B|C")
    assert "-test.run=^TestConformance$/(A|B|C)" in several
    assert not [a for a in plain if a.startswith("-test.skip=")]


def test_the_skip_regex_hits_the_named_tests_at_their_level_only() -> None:
    skips = (policyapi.ApiSkip(("CNPAdminTierGress", "CNPAdminTierIngressSCTP"), "r"),)
    regex = policyapi.skip_regex(skips)
    assert policyapi.skip_regex(()) == ""
    top, name = regex.split("/")  # Go matches each part against one level of the name
    assert re.search(top, "TestConformance") and not re.search(top, "TestConformanceProfiles")
    assert re.search(name, "CNPAdminTierGress") and re.search(name, "CNPAdminTierIngressSCTP")
    assert not re.search(name, "CNPBaselineTierGress") and not re.search(name, "CNPAdminTierGressX")


def test_the_binaries_each_suite_needs() -> None:
    assert netpol.needed_binaries(["e2e"], True) == ["kubectl", "e2e.test", "ginkgo"]
    assert netpol.needed_binaries(["api"], True) == ["kubectl", policyapi.BINARY_NOSCTP,
                                                     "test2json"]
    assert policyapi.BINARY in netpol.needed_binaries(["e2e", "api"], False)


def test_make_k8s_builds_both_binaries_and_test2json_stamped_with_the_pin(
        tmp_path: Path) -> None:
    (step,) = [s for s in build.STEPS if s.name == "network-policy-api"]
    assert step.outputs == (policyapi.BINARY, policyapi.BINARY_NOSCTP, "test2json")
    assert step.stamp_name == f"network-policy-api@{policyapi.pin()[1]}"
    assert build.STEPS[-1] is step  # after e2e.test: nothing waits for it
    (tmp_path / "bin").mkdir()
    (tmp_path / "stamps").mkdir()
    for name in step.outputs:
        (tmp_path / "bin" / name).write_bytes(b"")
    (tmp_path / "stamps" / "network-policy-api").touch()  # a stamp of no version
    assert not build.step_done(step, tmp_path)
    (tmp_path / "stamps" / step.stamp_name).touch()
    assert build.step_done(step, tmp_path)


def test_the_makefile_and_readme_name_make_netpol() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "\nnetpol: setup\n\t$(PY) -m pcn_lab.cluster.netpol $(NETPOL_ARGS)\n" in makefile
    readme = (ROOT / "README.md").read_text()
    assert "make netpol" in readme and "bench/results/netpol.json" in readme
    assert "bench/results/network-policy-api.json" in readme


# ---------------------------------------------------------------- results
def _ev(action: str, test: str | None = None, **kw: Any) -> str:
    ev: dict[str, Any] = {"Time": "2026-12-01T03:00:00Z", "Action": action, "Package": PKG}
    if test is not None:
        ev["Test"] = test
    ev.update(kw)
    return json.dumps(ev)


T = "TestConformance"
EVENTS = [
    _ev("start"),
    _ev("run", T),
    _ev("output", T, Output="    suite.go:140: Test Setup: Applying base manifests\n"),
    _ev("run", f"{T}/CNPAdminTierIngressTCP"),
    _ev("run", f"{T}/CNPAdminTierIngressTCP/Should_support_an_'allow-ingress'_policy"),
    _ev("pass", f"{T}/CNPAdminTierIngressTCP/Should_support_an_'allow-ingress'_policy",
        Elapsed=1.5),
    _ev("run", f"{T}/CNPAdminTierIngressTCP/Should_support_a_'deny-ingress'_policy"),
    _ev("output", f"{T}/CNPAdminTierIngressTCP/Should_support_a_'deny-ingress'_policy",
        Output="    helper.go:104: Expected connection to be dropped from a to b, but it "
               "connected\n"),
    _ev("output", f"{T}/CNPAdminTierIngressTCP/Should_support_a_'deny-ingress'_policy",
        Output="        \tError:      \tCondition never satisfied\n"),
    _ev("output", f"{T}/CNPAdminTierIngressTCP/Should_support_a_'deny-ingress'_policy",
        Output="    --- FAIL: TestConformance/CNPAdminTierIngressTCP/Should_support_a_"
               "'deny-ingress'_policy (10.20s)\n"),
    _ev("fail", f"{T}/CNPAdminTierIngressTCP/Should_support_a_'deny-ingress'_policy",
        Elapsed=10.2),
    _ev("fail", f"{T}/CNPAdminTierIngressTCP", Elapsed=11.7),
    _ev("run", f"{T}/CNPAdminTierEgressNamedPort"),
    _ev("output", f"{T}/CNPAdminTierEgressNamedPort",
        Output="    suite.go:197: Skipping CNPAdminTierEgressNamedPort: suite does not support "
               "ClusterNetworkPolicyNamedPorts\n"),
    _ev("skip", f"{T}/CNPAdminTierEgressNamedPort", Elapsed=0),
    _ev("run", f"{T}/CNPAdminTierPriorityField"),
    _ev("run", f"{T}/CNPAdminTierPriorityField/Should_read_the_priority"),
    _ev("pass", f"{T}/CNPAdminTierPriorityField/Should_read_the_priority", Elapsed=0.3),
    _ev("output", f"{T}/CNPAdminTierPriorityField",
        Output="    apply.go:120: Error: unable to delete the policy\n"),
    _ev("fail", f"{T}/CNPAdminTierPriorityField", Elapsed=2.0),
    _ev("run", f"{T}/CNPAdminTierSamePriority"),
    _ev("output", f"{T}/CNPAdminTierSamePriority", Output="panic: test timed out after 60m0s\n"),
    "panic: test timed out after 60m0s (not an event: the binary's own last words)",
    _ev("fail", T, Elapsed=3600),
    _ev("fail", Elapsed=3600.1),
]


def test_test2json_events_become_rows() -> None:
    skips = (policyapi.ApiSkip(("CNPAdminTierIngressSCTP",), "no SCTP here", "no-sctp"),)
    rows = policyapi.parse_events(EVENTS, skips)
    by = {r.name: r for r in rows}
    ok = by["CNPAdminTierIngressTCP/Should_support_an_'allow-ingress'_policy"]
    assert (ok.result, ok.seconds, ok.detail) == (conf.PASSED, 1.5, "")
    bad = by["CNPAdminTierIngressTCP/Should_support_a_'deny-ingress'_policy"]
    assert (bad.result, bad.seconds) == (conf.FAILED, 10.2)
    assert bad.detail == "Condition never satisfied"
    assert "CNPAdminTierIngressTCP" not in by  # a parent failed by its subtest: no row
    named = by["CNPAdminTierEgressNamedPort"]
    assert named.result == conf.SKIPPED
    assert named.detail == ("Skipping CNPAdminTierEgressNamedPort: suite does not support "
                            "ClusterNetworkPolicyNamedPorts")
    own = by["CNPAdminTierPriorityField"]  # its subtests passed, its cleanup failed
    assert own.result == conf.FAILED and own.detail == "unable to delete the policy"
    hung = by["CNPAdminTierSamePriority"]
    assert hung.result == conf.FAILED and hung.detail.startswith("started but never ended")
    assert "timed out" in hung.detail
    assert by["CNPAdminTierIngressSCTP"] == conf.TestResult(
        "CNPAdminTierIngressSCTP", conf.SKIPPED, 0.0, "no SCTP here")
    assert T not in by
    assert conf.summary(rows) == {"run": 5, "passed": 2, "failed": 3, "skipped": 2}
    text = conf.table(rows, source="netpol.toml")
    assert "5 run: 2 passed, 3 failed; 2 skipped (reasons above, from netpol.toml" in text


def test_a_failed_setup_is_one_failed_row() -> None:
    """The events of the built binary without a cluster (no kubeconfig):
    TestConformance fails before any subtest."""
    events = [
        _ev("start"), _ev("run", T),
        _ev("output", T, Output="=== RUN   TestConformance\n"),
        _ev("output", T, Output="    conformance_test.go:38: Error loading Kubernetes config: "
                                "invalid configuration: no configuration has been provided\n"),
        _ev("output", T, Output="--- FAIL: TestConformance (0.00s)\n"),
        _ev("fail", T, Elapsed=0), _ev("output", Output="FAIL\n"), _ev("fail", Elapsed=0.02)]
    (row,) = policyapi.parse_events(events)
    assert (row.name, row.result) == (T, conf.FAILED)
    assert row.detail == ("Error loading Kubernetes config: invalid configuration: no "
                          "configuration has been provided")


NETPOL_JUNIT = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="4" failures="1">
  <testsuite name="Kubernetes e2e suite" tests="4" failures="1">
    <testcase name="[SynchronizedBeforeSuite]" status="passed" time="2"></testcase>
    <testcase name="[It] [sig-network] Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' policy [Feature:NetworkPolicy]" status="failed" time="61.5">
      <failure message="Expected&#xA;    &lt;int&gt;: 6&#xA;to equal 0" type="failed"></failure>
    </testcase>
    <testcase name="[It] [sig-network] Netpol API should support creating NetworkPolicy API operations" status="passed" time="3.2"></testcase>
    <testcase name="[It] [sig-network] Netpol [Feature:SCTPConnectivity] [LinuxOnly] NetworkPolicy between server and client using SCTP should support a 'default-deny-ingress' policy [Feature:NetworkPolicy]" status="skipped" time="0">
      <skipped message="skipped"></skipped>
    </testcase>
    <testcase name="[It] [sig-network] Services should serve a basic endpoint from pods" status="skipped" time="0">
      <skipped message="skipped"></skipped>
    </testcase>
  </testsuite>
</testsuites>
"""


def test_the_netpol_junit_becomes_the_table(tmp_path: Path) -> None:
    f = tmp_path / "junit.xml"
    f.write_text(NETPOL_JUNIT)
    sel = conf.load_selection(netpol.SELECTION_FILE, frozenset({policyapi.NO_SCTP}))
    rows = conf.parse_junit(f, sel)
    assert len(rows) == 3  # the Services spec is outside the focus
    assert conf.summary(rows) == {"run": 2, "passed": 1, "failed": 1, "skipped": 1}
    (skipped,) = [r for r in rows if r.result == conf.SKIPPED]
    assert "CONFIG_IP_SCTP" in skipped.detail
    (failed,) = [r for r in rows if r.result == conf.FAILED]
    assert failed.detail == "Expected"


def test_results_files_have_the_conformance_shape(tmp_path: Path) -> None:
    rows = policyapi.parse_events(EVENTS)
    out = tmp_path / "network-policy-api.json"
    conf.write_results(out, rows, {"suite": "x"})
    doc = json.loads(out.read_text())
    assert doc["summary"] == conf.summary(rows) and len(doc["results"]) == len(rows)
    assert {"test", "result", "seconds"} <= set(doc["results"][0])
    assert netpol.E2E_OUTPUT.name == "netpol.json"
    assert netpol.E2E_OUTPUT.parent == conf.DEFAULT_OUTPUT.parent == ROOT / "bench" / "results"


def test_the_focus_selects_exactly_the_netpol_specs_of_the_built_e2e() -> None:
    """Against the built e2e.test's own list (`--list-tests`: "<file>:<line>:
    <full name>"): the focus takes every spec of test/e2e/network/netpol and
    nothing else; without SCTP exactly the SCTPConnectivity ones are skipped."""
    import subprocess

    try:
        e2e = artifacts.binary("e2e.test")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = subprocess.run([str(e2e), "--list-tests"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    specs = [re.split(r":\d+: ", ln.strip(), maxsplit=1) for ln in out.splitlines()
             if re.search(r"\.go:\d+: ", ln)]
    sel = conf.load_selection(netpol.SELECTION_FILE, frozenset({policyapi.NO_SCTP}))
    chosen = {name for path, name in specs if sel.selected(name)}
    netpol_dir = {name for path, name in specs if "/test/e2e/network/netpol/" in path}
    assert chosen == netpol_dir and len(chosen) >= 45
    skipped = {name for name in chosen if sel.skip_reason(name)}
    assert skipped == {name for name in chosen if "[Feature:SCTPConnectivity]" in name}
    assert len(skipped) == 3


def test_a_narrowed_run_writes_its_results_in_the_lab_folder() -> None:
    lab = Path("/run/pcn-netpol")
    assert netpol.output_paths(lab, (), "") == (netpol.E2E_OUTPUT, netpol.API_OUTPUT)
    assert netpol.output_paths(lab, ("Netpol.*named port",), "CNPAdmin") == (
        lab / "e2e" / "results.json", lab / "network-policy-api" / "results.json")
    mine = Path("/tmp/mine.json")
    assert netpol.output_paths(lab, ("x",), "y", mine, mine) == (mine, mine)
