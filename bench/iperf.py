"""iperf3 TCP throughput between two network namespaces."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

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


def wait_idle(netns: str, port: int = PORT, timeout: float = 10) -> float:
    """Wait until the iperf3 server on `port` in `netns` has no established
    connection left (the seconds waited). An iperf3 server runs one test at
    a time and answers a client that comes while it still ends the previous
    one (its last data draining through a slow shaper, the results
    exchange) with a refusal or a reset ("unable to receive control
    message: Connection reset by peer"); runs back to back to one server
    wait for it first. RuntimeError after `timeout` s."""
    t0 = time.monotonic()
    while True:
        out = exec_in(netns, ["ss", "-Htn", "state", "established", f"sport = :{port}"],
                      check=False).stdout
        if not out.strip():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"iperf3 server in {netns} still busy after {timeout:.0f} s: "
                               f"{out.strip()[:300]}")
        time.sleep(0.05)


def report_end(what: str, returncode: int | None, out: str, err: str) -> dict[str, Any]:
    """The `end` section of an iperf3 client's JSON report (-J); RuntimeError
    naming `what` when the client printed none (it failed before measuring:
    its stderr or stdout is in the message) or reported an error."""
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"{what} failed ({returncode}): {err.strip() or out.strip()}") \
            from None
    if "error" in report:
        raise RuntimeError(f"{what}: {report['error']}")
    return dict(report["end"])


def run_client(client_ns: str, server_ip: str, duration: float, pinning: Pinning,
               port: int = PORT) -> tuple[float, int]:
    """One iperf3 TCP run; returns (received Gbit/s, sender retransmits)."""
    argv = ["iperf3", "-c", server_ip, "-p", str(port), "-t", str(duration), "-O", str(OMIT_S),
            "-J", *_affinity(pinning.client)]
    proc = exec_in(client_ns, argv, timeout=duration + OMIT_S + 30, check=False)
    end = report_end(f"iperf3 client in {client_ns} to {server_ip}", proc.returncode,
                     proc.stdout, proc.stderr)
    return end["sum_received"]["bits_per_second"] / 1e9, int(end["sum_sent"].get("retransmits", 0))


def start_server(netns: str, pinning: Pinning, port: int = PORT) -> subprocess.Popen[str]:
    """An iperf3 server in `netns`, listening when this returns; stop it with netns.stop()."""
    server = popen_in(netns, ["iperf3", "-s", "-p", str(port), *_affinity(pinning.server)])
    try:
        _wait_listening(netns, server, port)
    except BaseException:
        stop(server)
        raise
    return server
