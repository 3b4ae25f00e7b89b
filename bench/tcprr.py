"""TCP request/response rate (netperf's TCP_RR): one connection kept open,
the client sends a small message and waits for its echo before the next, so
the rate (transactions per second) is 1 / the round trip of the path, with
no connection setup in it (bench.rr measures that: a new connection per
request). Measured with sockperf's ping-pong (`sockperf ping-pong --tcp`
against `sockperf server --tcp`, Debian package sockperf), C on both ends,
so the figure is the path's and the kernel's, not an interpreter's.

sockperf reports, at the end of a run (stderr and stdout alike):

    sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=58437; ReceivedMessages=58437
    sockperf: Summary: Latency is 13.253 usec

Latency there is half the round trip; `parse` keeps the run time and the
messages received, the rate being received / run time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from .netns import exec_in, popen_in, stop

PORT = 11111  # sockperf's default; the services' target port for it
MESSAGE_BYTES = 64
_VALID = re.compile(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); "
                    r"ReceivedMessages=(\d+)")
_LATENCY = re.compile(r"Summary: Latency is ([\d.]+) usec")


@dataclass(frozen=True)
class RrRun:
    seconds: float  # sockperf's valid duration
    received: int  # answers received
    half_rtt_us: float  # sockperf's "latency": half the mean round trip

    @property
    def rate(self) -> float:
        """Transactions (request + answer) per second."""
        return self.received / self.seconds if self.seconds else 0.0


def parse(text: str) -> RrRun:
    """The summary of a sockperf ping-pong run. Raises ValueError when the
    text has none (the client failed before measuring)."""
    valid, lat = _VALID.search(text), _LATENCY.search(text)
    if valid is None or lat is None:
        raise ValueError(f"no sockperf summary in: {text.strip()[-300:]!r}")
    return RrRun(float(valid.group(1)), int(valid.group(3)), float(lat.group(1)))


def available() -> bool:
    return shutil.which("sockperf") is not None


def start_server(netns: str, port: int = PORT) -> subprocess.Popen[str]:
    """A sockperf TCP server in `netns` on `port`, listening when this returns."""
    proc = popen_in(netns, ["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", str(port)])
    try:
        deadline = time.monotonic() + 10
        while not exec_in(netns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
            if proc.poll() is not None:
                raise RuntimeError(f"sockperf server in {netns} exited: "
                                   f"{proc.communicate()[1].strip()[-300:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sockperf server in {netns} not listening after 10 s")
            time.sleep(0.05)
    except BaseException:
        stop(proc)
        raise
    return proc


def run_client(netns: str, host: str, port: int, seconds: float) -> RrRun:
    """One ping-pong run of `seconds` from `netns` to host:port."""
    proc = exec_in(netns, ["sockperf", "ping-pong", "--tcp", "-i", host, "-p", str(port),
                           "-t", f"{seconds:g}", "-m", str(MESSAGE_BYTES)],
                   timeout=seconds + 30, check=False)
    try:
        return parse(proc.stdout + proc.stderr)
    except ValueError as exc:
        raise RuntimeError(f"sockperf ping-pong in {netns} to {host}:{port} failed "
                           f"({proc.returncode}): {exc}") from None
