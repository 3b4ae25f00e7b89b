"""Request latency between namespaces: `pcn_lab.probe serve --rr` servers and
`pcn_lab.probe rr` clients (each request a new TCP connection, a small
request line and a small answer line)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field

from .netns import exec_in, stop

PORT = 8080  # where the rr servers listen (the services' target port)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def probe_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pcn_lab.probe", *args]


def start_server(netns: str, name: str, ports: tuple[int, ...] = (PORT,)
                 ) -> subprocess.Popen[str]:
    """An rr server in `netns` on `ports`, answering with its `name`; listening
    when this returns."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "env", f"PCN_PROBE_NAME={name}",
                             *probe_argv("serve", *(a for p in ports for a in ("--rr", str(p))))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if "listening" not in line:
            raise RuntimeError(f"rr server in {netns} did not start: {line!r}")
    except BaseException:
        stop(proc)
        raise
    return proc


@dataclass
class Latency:
    """Pooled samples (microseconds) of several rr runs."""

    samples_us: list[float] = field(default_factory=list)
    hosts: dict[str, int] = field(default_factory=dict)

    def add(self, report: dict) -> None:
        self.samples_us += report.get("samples_us", [])
        for h, n in report.get("hosts", {}).items():
            self.hosts[h] = self.hosts.get(h, 0) + n

    @property
    def p50(self) -> float:
        return percentile(self.samples_us, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples_us, 99)


def run_client(netns: str, host: str, port: int, count: int, timeout: float = 2.0) -> dict:
    """One rr run; its report with every sample. Raises if any exchange failed."""
    proc = exec_in(netns, probe_argv("rr", host, str(port), "--count", str(count), "--timeout",
                                     str(timeout), "--raw"),
                   timeout=30 + count * (timeout + 0.05), check=False)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"rr client in {netns} to {host}:{port} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-300:]}") from None
    if not report.get("ok"):
        report.pop("samples_us", None)
        raise RuntimeError(f"rr client in {netns} to {host}:{port}: {report}")
    return report

