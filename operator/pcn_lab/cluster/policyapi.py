"""sigs.k8s.io/network-policy-api's conformance suite: its pin, its build
inputs, its command line and its results (no cluster needed here).

The suite (the module's conformance/ package, upstream's Makefile target
``conformance``: ``go test ./conformance -run '^TestConformance$' -args
<flags>``) applies its base manifests (five namespaces, a StatefulSet of two
agnhost pods each, one of them host-network), waits for them, then runs one
Go test per ClusterNetworkPolicy behaviour, each with subtests that create
policies (policy.networking.k8s.io, storage version v1beta1; the CRD serves
v1alpha2 too) and probe with ``/agnhost connect`` through pod exec. `make
k8s` compiles it (``go test -c``) into ``bin/`` (pcn_lab.cluster.build,
step network-policy-api); `make netpol` runs the binary through Go's
``test2json`` and reads the JSON events back into results rows.

Its base manifests run ``agnhost porter`` with ``SERVE_SCTP_PORT_<n>`` in
two containers of every StatefulSet: porter exits (log.Fatal) when the
kernel cannot open an SCTP socket, those containers crash-loop, no pod is
ever Ready and the suite's setup fails every test. The suite embeds its
manifests, so for kernels without SCTP a second binary is built from the
same source with those containers removed (without_sctp_servers) and the
tests that probe SCTP are skipped (netpol.toml, ``when = "no-sctp"``).
"""

from __future__ import annotations

import errno
import json
import re
import socket
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcn_lab.cluster.conformance import FAILED, PASSED, SKIPPED, SelectionError, TestResult

SELECTION_FILE = Path(__file__).with_name("netpol.toml")
#: The compiled suite as published, and the one without SCTP servers (in bin/).
BINARY = "network-policy-api-conformance.test"
BINARY_NOSCTP = "network-policy-api-conformance-nosctp.test"
#: The base manifests inside the module (embedded into the binary).
BASE_MANIFESTS = Path("conformance") / "base" / "manifests.yaml"
#: The suite's one top-level test (conformance_test.go).
TOP_TEST = "TestConformance"
#: The condition under which `when = "no-sctp"` skips apply.
NO_SCTP = "no-sctp"
KNOWN_CONDITIONS = frozenset({NO_SCTP})


def kernel_has_sctp() -> bool:
    """Whether this kernel opens SCTP sockets (AF_INET, SOCK_STREAM,
    IPPROTO_SCTP; the attempt loads the sctp module where there is one, as
    the first pod's socket would). Every lab node is a namespace of this
    kernel, so this is the answer for every pod. Other errors propagate."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT):
            return False
        raise
    sock.close()
    return True


def conditions() -> frozenset[str]:
    """The conditions of this machine that `when` keys name."""
    return frozenset() if kernel_has_sctp() else frozenset({NO_SCTP})


# ---------------------------------------------------------------- the selection
@dataclass(frozen=True)
class ApiSkip:
    tests: tuple[str, ...]  # TestConformance/<name>: exact names
    reason: str
    when: str = ""  # a KNOWN_CONDITIONS member, or "" (always)


@dataclass(frozen=True)
class ApiSelection:
    module: str
    version: str
    features: tuple[str, ...]
    timeout: str
    skips: tuple[ApiSkip, ...]
    lab_channel: str = "standard"  # the CRD channel the lab installs (config/crd/<it>)

    def active_skips(self, present: Iterable[str]) -> tuple[ApiSkip, ...]:
        """The skips that apply on a machine with the `present` conditions."""
        have = set(present)
        return tuple(s for s in self.skips if not s.when or s.when in have)


def load(path: Path = SELECTION_FILE) -> ApiSelection:
    """The ``[network-policy-api]`` table of netpol.toml: ``module``,
    ``version``, ``supported-features``, ``lab-crd-channel`` (standard or
    experimental: the CRD the lab installs), ``timeout`` (a Go duration) and
    ``[[network-policy-api.skip]]`` tables of ``tests`` (exact names), a
    non-empty ``reason`` and an optional ``when``. Raises SelectionError."""
    data = tomllib.loads(path.read_text()).get("network-policy-api")
    if not isinstance(data, dict):
        raise SelectionError(f"{path}: no [network-policy-api] table")
    module, version = str(data.get("module", "")), str(data.get("version", ""))
    if not module or not re.fullmatch(r"v\d+\.\d+\.\d+(?:[-+].*)?", version):
        raise SelectionError(f"{path}: [network-policy-api] needs module and version vX.Y.Z")
    features = tuple(str(f) for f in data.get("supported-features", []))
    timeout = str(data.get("timeout", "60m"))
    if not re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", timeout) or not timeout:
        raise SelectionError(f"{path}: timeout {timeout!r} is not a Go duration like 60m")
    skips: list[ApiSkip] = []
    for i, entry in enumerate(data.get("skip", [])):
        tests = tuple(str(t) for t in entry.get("tests", []))
        reason, when = str(entry.get("reason", "")).strip(), str(entry.get("when", ""))
        if not tests or not reason:
            raise SelectionError(f"{path}: network-policy-api skip #{i + 1} needs tests and a "
                                 "reason")
        bad = [t for t in tests if not re.fullmatch(r"[A-Za-z0-9]+", t)]
        if bad:
            raise SelectionError(f"{path}: {bad} are not test names (exact, no patterns)")
        if when and when not in KNOWN_CONDITIONS:
            raise SelectionError(f"{path}: unknown condition when = {when!r} "
                                 f"(known: {sorted(KNOWN_CONDITIONS)})")
        skips.append(ApiSkip(tests, reason, when))
    channel = str(data.get("lab-crd-channel", "standard"))
    if channel not in ("standard", "experimental"):
        raise SelectionError(f"{path}: lab-crd-channel {channel!r} is neither standard nor "
                             "experimental")
    return ApiSelection(module, version, features, timeout, tuple(skips), channel)


def pin(path: Path = SELECTION_FILE) -> tuple[str, str]:
    """(module, version) of the suite, from netpol.toml."""
    sel = load(path)
    return sel.module, sel.version


def module_dir(gomodcache: Path, path: Path = SELECTION_FILE) -> Path:
    """The pinned module's folder in a Go module cache (``go mod download``
    puts it at ``<cache>/<module>@<version>``, lower-case paths as they are
    here). Raises FileNotFoundError naming `make k8s`."""
    module, version = pin(path)
    found = gomodcache / f"{module}@{version}"
    if not found.is_dir():
        raise FileNotFoundError(f"{found} is missing: run `make k8s` (its network-policy-api "
                                f"step downloads {module}@{version})")
    return found


# ---------------------------------------------------------------- the SCTP-less base
_CONTAINERS = re.compile(r"^(\s*)containers:\s*$")
_ITEM = re.compile(r"^(\s*)- ")


def without_sctp_servers(text: str) -> str:
    """The base manifests without their SCTP server containers.

    Works on the text, not on parsed YAML: the file is a Go text/template
    (``{{ index .HostNetworkPorts 0 }}`` as unquoted values) that the suite
    executes before parsing. Within every ``containers:`` list, an item
    (from its ``- `` line to the next line indented as far or less) that
    mentions ``SERVE_SCTP_PORT_`` is dropped; everything else is kept byte for
    byte. Raises ValueError when nothing is dropped or a mention is left (the
    upstream layout changed: look again)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    dropped = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        match = _CONTAINERS.match(line)
        if not match:
            continue
        list_indent = len(match.group(1))
        while i < len(lines):
            item = _ITEM.match(lines[i])
            if item is None or len(item.group(1)) < list_indent:
                break
            indent = len(item.group(1))
            end = i + 1
            while end < len(lines) and (not lines[end].strip()
                                        or _indent(lines[end]) > indent):
                end += 1
            block = lines[i:end]
            if any("SERVE_SCTP_PORT_" in b for b in block):
                dropped += 1
            else:
                out += block
            i = end
    result = "".join(out)
    if dropped == 0 or "SERVE_SCTP_PORT_" in result:
        raise ValueError("the base manifests' SCTP servers were not found where expected "
                         f"(dropped {dropped}): the upstream layout changed")
    return result


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


# ---------------------------------------------------------------- the run's command line
def skip_regex(skips: Sequence[ApiSkip]) -> str:
    """``-test.skip``'s value for `skips`: Go splits it at ``/`` and matches
    each part against one level of the test's name, so this skips exactly
    TestConformance/<name> (and its subtests) for every listed name; "" when
    there is nothing to skip."""
    names = sorted({t for s in skips for t in s.tests})
    return f"^{TOP_TEST}$/^({'|'.join(names)})$" if names else ""


def argv(bin_dir: Path, selection: ApiSelection, skips: Sequence[ApiSkip], nosctp: bool,
         cleanup: bool = True, only: str = "") -> list[str]:
    """The command line: Go's test2json running the compiled suite (as
    upstream's Makefile runs it: ``-run '^TestConformance$'`` plus the suite's
    own flags), its JSON events on stdout. `only`: a regular expression of
    the tests to run (TestConformance/<only>; "" runs all). The kubeconfig
    comes from $KUBECONFIG (controller-runtime's and client-go's default
    rules)."""
    binary = bin_dir / (BINARY_NOSCTP if nosctp else BINARY)
    # Go's -test.run splits its pattern at each top-level "|": A|B must be
    # one group, or only the first alternative stays under TestConformance
    run = f"^{TOP_TEST}$" + (f"/({only})" if only else "")
    out = [str(bin_dir / "test2json"), "-t", "-p", f"{selection.module}/conformance",
           str(binary), "-test.v=test2json", f"-test.run={run}",
           f"-test.timeout={selection.timeout}",
           f"-cleanup-base-resources={'true' if cleanup else 'false'}"]
    if selection.features:
        out.append(f"-supported-features={','.join(selection.features)}")
    regex = skip_regex(skips)
    if regex:
        out.append(f"-test.skip={regex}")
    return out


# ---------------------------------------------------------------- the results
def _display(test: str) -> str:
    """A results row's name: the test's path without the top-level test."""
    return test[len(TOP_TEST) + 1:] if test.startswith(TOP_TEST + "/") else test


def _detail(output: Sequence[str], action: str) -> str:
    """The line that says why: testify's ``Error:`` line, the suite's
    ``Skipping ...`` or ``FAILED``/``Expected`` log line, else the first."""
    lines = [ln.strip() for ln in output if ln.strip() and not ln.lstrip().startswith(("===",
                                                                                      "---"))]
    keys = ("Skipping",) if action == "skip" else ("Error:", "FAILED", "Expected", "error")
    for key in keys:
        for ln in lines:
            if key in ln:
                text = ln.split("Error:", 1)[1] if key == "Error:" else ln
                return re.sub(r"^\S+\.go:\d+:\s*", "", text.strip())[:300]
    return re.sub(r"^\S+\.go:\d+:\s*", "", lines[0])[:300] if lines else ""


def parse_events(lines: Iterable[str], skips: Sequence[ApiSkip] = ()) -> list[TestResult]:
    """Results rows from test2json's events (one JSON object per line; other
    lines, such as a crash's output, are ignored).

    A row per leaf test (a test none of whose subtests ran: the subtests of
    the ClusterNetworkPolicy tests, or a test that failed or was skipped
    before its subtests), plus a failed parent whose subtests all passed (its
    own failure, e.g. a cleanup); then a skipped row per test of `skips`
    (``-test.skip`` hides them from the events) with its reason. A test that
    started but never ended (the binary died or timed out) is failed."""
    actions: dict[str, str] = {}
    elapsed: dict[str, float] = {}
    output: dict[str, list[str]] = {}
    for raw in lines:
        try:
            ev: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError:
            continue
        test = ev.get("Test")
        if not isinstance(test, str) or not test:
            continue
        action = ev.get("Action", "")
        if action == "run":
            actions.setdefault(test, "run")
        elif action == "output":
            output.setdefault(test, []).append(str(ev.get("Output", "")))
        elif action in ("pass", "fail", "skip"):
            actions[test] = action
            elapsed[test] = float(ev.get("Elapsed", 0) or 0)
    kind = {"pass": PASSED, "fail": FAILED, "skip": SKIPPED, "run": FAILED}
    out: list[TestResult] = []
    for test, action in actions.items():
        children = [t for t in actions if t.startswith(test + "/")]
        own_failure = action == "fail" and children and all(actions[c] != "fail"
                                                            for c in children)
        if children and not own_failure:
            continue
        detail = _detail(output.get(test, []), action) if action != "pass" else ""
        if action == "run":
            detail = "started but never ended (the suite crashed or timed out): " + detail
        out.append(TestResult(_display(test), kind[action], elapsed.get(test, 0.0), detail))
    for skip in skips:
        out += [TestResult(name, SKIPPED, 0.0, skip.reason) for name in skip.tests]
    return out
