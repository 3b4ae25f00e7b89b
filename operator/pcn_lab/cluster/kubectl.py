"""The built kubectl, run from the root namespace against the lab's relay
with the admin kubeconfig (``<lab dir>/kubeconfig``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from pcn_lab.cluster import artifacts


def argv(kubeconfig: Path, *args: str) -> list[str]:
    return [str(artifacts.binary("kubectl")), f"--kubeconfig={kubeconfig}", *args]


def run(kubeconfig: Path, *args: str, timeout: float = 120, check: bool = True,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run kubectl; with `check`, a failure raises RuntimeError with its stderr."""
    r = subprocess.run(argv(kubeconfig, *args), capture_output=True, text=True,
                       timeout=timeout, input=stdin)
    if check and r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def get(kubeconfig: Path, *args: str) -> dict[str, Any]:
    """`kubectl get ... -o json`, parsed."""
    out: dict[str, Any] = json.loads(run(kubeconfig, "get", *args, "-o", "json").stdout)
    return out


def ok(kubeconfig: Path, *args: str, timeout: float = 30) -> bool:
    try:
        return run(kubeconfig, *args, timeout=timeout, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False
