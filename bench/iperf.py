"""iperf3 TCP throughput between two network namespaces."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .netns import exec_in, popen_in, stop

log = logging.getLogger(__name__)

PORT = 5201
OMIT_S = 1  # first second of each run (slow start) is not counted


@dataclass(frozen=True)
class Pinning:
    """CPUs for iperf3's client and server (iperf3 -A), None: not pinned."""

    client: int | None = None
    server: int | None = None

    def describe(self) -> str:
        if self.client is None and self.server is None:
            return "not pinned"
        return f"client on CPU {self.client}, server on CPU {self.server}"


@dataclass
class Throughput:
    runs_gbps: list[float] = field(default_factory=list)
    retransmits: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs_gbps)


def _affinity(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["-A", str(cpu)]


def _wait_listening(netns: str, server: subprocess.Popen[str], port: int,
                    timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            _, err = server.communicate()
            raise RuntimeError(f"iperf3 server in {netns} exited: {err.strip()}")
        out = exec_in(netns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"iperf3 server in {netns} not listening after {timeout:.0f} s")


def run_client(client_ns: str, server_ip: str, duration: float, pinning: Pinning,
               port: int = PORT) -> tuple[float, int]:
    """One iperf3 TCP run; returns (received Gbit/s, sender retransmits)."""
    argv = ["iperf3", "-c", server_ip, "-p", str(port), "-t", str(duration), "-O", str(OMIT_S),
            "-J", *_affinity(pinning.client)]
    proc = exec_in(client_ns, argv, timeout=duration + OMIT_S + 30, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 client in {client_ns} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}") from None
    if "error" in report:
        raise RuntimeError(f"iperf3 client in {client_ns} to {server_ip}: {report['error']}")
    end = report["end"]
    return end["sum_received"]["bits_per_second"] / 1e9, int(end["sum_sent"].get("retransmits", 0))


def measure(client_ns: str, server_ns: str, server_ip: str, *, runs: int, duration: float,
            pinning: Pinning, progress: Callable[[str], None]) -> Throughput:
    """`runs` iperf3 TCP runs from client_ns to server_ip (in server_ns)."""
    server = popen_in(server_ns, ["iperf3", "-s", "-p", str(PORT), *_affinity(pinning.server)])
    try:
        _wait_listening(server_ns, server, PORT)
        result = Throughput()
        for i in range(1, runs + 1):
            gbps, retr = run_client(client_ns, server_ip, duration, pinning)
            result.runs_gbps.append(gbps)
            result.retransmits.append(retr)
            progress(f"run {i}/{runs}: {gbps:.2f} Gbit/s ({retr} retransmits)")
        return result
    finally:
        stop(server)
