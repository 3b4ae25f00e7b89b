"""pcn_lab.cluster.conformance: the selection file, upstream's command line,
and the JUnit -> results table (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcn_lab.cluster import conformance as conf

JUNIT = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="5" disabled="0" errors="0" failures="1" time="50">
  <testsuite name="Kubernetes e2e suite" package="/e2e" tests="5" failures="1" time="50">
    <testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="3.1"></testcase>
    <testcase name="[It] [sig-network] Services should serve a basic endpoint from pods  [Conformance]" classname="Kubernetes e2e suite" status="passed" time="12.5"></testcase>
    <testcase name="[It] [sig-network] Services should be able to change the type from ExternalName to ClusterIP [Conformance]" classname="Kubernetes e2e suite" status="failed" time="30.2">
      <failure message="Timed out after 30s: service not reachable&#xA;more lines" type="failed">trace</failure>
    </testcase>
    <testcase name="[It] [sig-network] LoadBalancers should be able to change the type of a service" classname="Kubernetes e2e suite" status="skipped" time="0">
      <skipped message="skipped"></skipped>
    </testcase>
    <testcase name="[It] [sig-storage] CSI mock volume should work" classname="Kubernetes e2e suite" status="skipped" time="0">
      <skipped message="skipped"></skipped>
    </testcase>
    <testcase name="[It] [sig-network] Services should check NodePort out-of-range" classname="Kubernetes e2e suite" status="skipped" time="0">
      <skipped message="skipped - Only supported for providers [gce]"></skipped>
    </testcase>
  </testsuite>
</testsuites>
"""


def _selection() -> conf.Selection:
    return conf.Selection(
        focus=(r"\[sig-network\].*\[Conformance\]", r"\[sig-network\] Services ",
               r"\[sig-network\] LoadBalancers"),
        skips=(conf.Skip("LoadBalancer", "no LoadBalancer here"),))


def test_the_checked_in_selection_loads_and_every_skip_has_a_reason() -> None:
    sel = conf.load_selection()
    assert any("Conformance" in p for p in sel.focus)
    assert sel.skips and all(s.reason for s in sel.skips)
    assert sel.skip_reason("[sig-network] LoadBalancers should work") is not None
    assert sel.skip_reason("[sig-network] Services should serve a basic endpoint "
                           "from pods  [Conformance]") is None
    assert sel.selected("[sig-network] Services should serve a basic endpoint from pods "
                        "[Conformance]")
    assert not sel.selected("[sig-storage] CSI mock volume should work")


@pytest.mark.parametrize("text,match", [
    ("focus = []\n", "no focus"),
    ("focus = ['a']\n[[skip]]\npattern = 'x'\n", "reason"),
    ("focus = ['(']\n", "bad regular expression"),
])
def test_a_bad_selection_file_names_the_fault(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(conf.SelectionError, match=match):
        conf.load_selection(f)


def test_the_command_line_is_upstreams(tmp_path: Path) -> None:
    argv = conf.ginkgo_argv(Path("/c/bin"), _selection(), tmp_path, Path("/k/admin.conf"),
                            parallel=3)
    assert argv[0] == "/c/bin/ginkgo" and "--procs=3" in argv
    sep = argv.index("--")
    assert argv[sep - 1] == "/c/bin/e2e.test"
    assert argv.count("--skip=LoadBalancer") == 1 and sum(a.startswith("--focus=") for a in argv) == 3
    assert "--provider=local" in argv[sep:] and "--kubeconfig=/k/admin.conf" in argv[sep:]
    assert "--num-nodes=2" in argv[sep:]  # else "Requires at least 2 nodes (not -1)" skips
    assert f"--output-dir={tmp_path}" in argv[:sep]


def test_junit_becomes_the_table(tmp_path: Path) -> None:
    f = tmp_path / "junit.xml"
    f.write_text(JUNIT)
    results = conf.parse_junit(f, _selection())
    by = {r.name: r for r in results}
    assert len(results) == 4  # the storage spec is outside the focus, the suite node passed
    ok = by["[sig-network] Services should serve a basic endpoint from pods  [Conformance]"]
    assert ok.result == conf.PASSED and ok.seconds == 12.5
    bad = next(r for r in results if r.result == conf.FAILED)
    assert bad.detail == "Timed out after 30s: service not reachable"
    lb = by["[sig-network] LoadBalancers should be able to change the type of a service"]
    assert lb.result == conf.SKIPPED and lb.detail == "no LoadBalancer here"
    gce = by["[sig-network] Services should check NodePort out-of-range"]
    assert gce.result == conf.SKIPPED and "providers [gce]" in gce.detail  # skipped by the test
    assert conf.summary(results) == {"run": 2, "passed": 1, "failed": 1, "skipped": 2}
    text = conf.table(results)
    assert text.splitlines()[2].startswith("failed")  # failures first
    assert "2 run: 1 passed, 1 failed; 2 skipped" in text


def test_a_failed_suite_setup_fails_the_run(tmp_path: Path) -> None:
    f = tmp_path / "junit.xml"
    f.write_text(JUNIT.replace('<testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes '
                               'e2e suite" status="passed" time="3.1"></testcase>',
                               '<testcase name="[SynchronizedBeforeSuite]" status="failed" '
                               'time="3.1"><failure message="nodes not ready"/></testcase>'))
    results = conf.parse_junit(f, _selection())
    assert any(r.name == "[SynchronizedBeforeSuite]" and r.result == conf.FAILED for r in results)


def test_a_rerun_of_some_tests_does_not_replace_the_full_runs_results(tmp_path: Path) -> None:
    """`make conformance CONFORMANCE_ARGS="--focus ..."` wrote its three
    results over bench/results/conformance.json, the full run's record."""
    from pcn_lab.cluster import conformance

    lab = tmp_path / "lab"
    assert conformance.results_path(None, (), lab) == conformance.DEFAULT_OUTPUT
    assert conformance.results_path(None, ("NodePort",), lab) == lab / "results.json"
    mine = tmp_path / "mine.json"
    assert conformance.results_path(mine, ("NodePort",), lab) == mine
