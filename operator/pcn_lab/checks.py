"""Connectivity checks between lab namespaces, shared by the demo and the tests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

TCP_PORT = 8080
UDP_PORT = 8081
_RTT = re.compile(r"rtt min/avg/max/mdev = [\d.]+/([\d.]+)/")


@dataclass
class CheckResult:
    source: str
    target: str
    protocol: str
    ok: bool
    latency_ms: float | None = None
    detail: str = ""
    expect_blocked: bool = False
    side_condition: bool = True  # something else the check requires, e.g. a counter moved
    extra: dict = field(default_factory=dict)  # the probe's full answer

    @property
    def passed(self) -> bool:
        return (self.ok != self.expect_blocked) and self.side_condition


class LabPodLike(Protocol):
    """What the checks use of a lab pod: its network namespace."""

    @property
    def netns(self) -> str: ...


class LabLike(Protocol):
    """What the checks use of a lab: a `topology.Lab` or the CLI's view of a running one."""

    @property
    def pods(self) -> Mapping[str, LabPodLike]: ...

    @property
    def ext_ns(self) -> str: ...

    def node_netns(self, name: str) -> str: ...

    def exec(self, netns: str, argv: list[str], timeout: float = 30,
             check: bool = False) -> subprocess.CompletedProcess[str]: ...

    def popen(self, netns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]: ...


def probe_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pcn_lab.probe", *args]


@contextmanager
def servers(lab: LabLike, names: list[str] | None = None,
            tcp_ports: tuple[int, ...] = (TCP_PORT,),
            udp_ports: tuple[int, ...] = (UDP_PORT,)) -> Iterator[None]:
    """Probe servers in the given lab pods (or "ext", or nodes), stopped afterwards."""
    procs = []
    ports = [a for p in tcp_ports for a in ("--tcp", str(p))]
    ports += [a for p in udp_ports for a in ("--udp", str(p))]
    try:
        for name in names or list(lab.pods):
            p = lab.popen(netns_of(lab, name), probe_argv("serve", *ports),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env={"PCN_PROBE_NAME": name, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            procs.append(p)
            line = p.stdout.readline() if p.stdout else ""
            if "listening" not in line:
                raise RuntimeError(f"probe server in {name} did not start")
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def ping(lab: LabLike, src: str, dst_ip: str, target: str | None = None, count: int = 3,
         interval: float = 0.2, timeout: float = 1.0, expect_blocked: bool = False) -> CheckResult:
    r = lab.exec(netns_of(lab, src), ["ping", "-n", "-q", "-c", str(count), "-i", str(interval),
                                       "-W", str(timeout), dst_ip],
                 timeout=count * (interval + timeout) + 10)
    m = _RTT.search(r.stdout)
    loss = re.search(r"(\d+(?:\.\d+)?)% packet loss", r.stdout)
    detail = f"{loss.group(1)}% loss" if loss else (r.stderr.strip() or r.stdout.strip())[-80:]
    return CheckResult(src, target or dst_ip, "icmp", r.returncode == 0 and loss is not None
                       and float(loss.group(1)) == 0.0, float(m.group(1)) if m else None, detail,
                       expect_blocked)


def tcp(lab: LabLike, src: str, dst_ip: str, target: str | None = None, nbytes: int = 1000,
        port: int = TCP_PORT, timeout: float = 5.0, expect_blocked: bool = False) -> CheckResult:
    out = probe(lab, src, ["tcp", dst_ip, str(port), "--bytes", str(nbytes), "--timeout",
                            str(timeout)], timeout + 10)
    proto = "tcp" if nbytes < 100_000 else f"tcp {nbytes // 1000} kB sha256"
    detail = out.get("error") or f"{out.get('received')} B, server saw {out.get('peer_seen')}"
    return CheckResult(src, target or dst_ip, proto, bool(out.get("ok")), out.get("total_ms"),
                       detail, expect_blocked, extra=out)


def udp(lab: LabLike, src: str, dst_ip: str, target: str | None = None, port: int = UDP_PORT,
        timeout: float = 3.0, expect_blocked: bool = False) -> CheckResult:
    out = probe(lab, src, ["udp", dst_ip, str(port), "--timeout", str(timeout)], timeout + 10)
    detail = out.get("error") or f"server saw {out.get('peer_seen')}"
    return CheckResult(src, target or dst_ip, "udp", bool(out.get("ok")), out.get("total_ms"),
                       detail, expect_blocked, extra=out)


def netns_of(lab: LabLike, name: str) -> str:
    """The namespace of a lab pod, of "ext" (the external host) or of a node
    (by its name: the node's own stack, where a kubelet runs)."""
    if name == "ext":
        return lab.ext_ns
    if name in lab.pods:
        return lab.pods[name].netns
    return lab.node_netns(name)


def probe(lab: LabLike, src: str, args: list[str], timeout: float) -> dict:
    """Run the probe client from a pod (or "ext") and return its JSON answer."""
    start = time.monotonic()
    r = lab.exec(netns_of(lab, src), probe_argv(*args), timeout=timeout)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": (r.stderr.strip() or "no output")[-120:],
                "total_ms": (time.monotonic() - start) * 1000}


def report(results: list[CheckResult], notes: list[str]) -> int:
    """Print the table, the notes (stderr) and the count; the exit status of
    `pcn-lab check`: 0 when there were checks and every one passed."""
    print(render(results, symbols=True))
    for note in notes:
        print(note, file=sys.stderr)
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed or not results else 0


def render(results: list[CheckResult], symbols: bool = False) -> str:
    """A plain-text table, one row per check (with ✓/✗ when `symbols`)."""
    head = ("from", "to", "protocol", "result", "latency", "detail")
    rows = [head]
    for r in results:
        if symbols:
            verdict = "✓" if r.passed else "✗"
            if r.expect_blocked:
                verdict += " blocked" if r.passed else " NOT blocked"
        else:
            verdict = "PASS" if r.passed else "FAIL"
            if r.expect_blocked:
                verdict += " (blocked as expected)" if r.passed else " (expected to be blocked)"
        lat = f"{r.latency_ms:.2f} ms" if r.latency_ms is not None and r.ok else "-"
        rows.append((r.source, r.target, r.protocol, verdict, lat, r.detail))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
