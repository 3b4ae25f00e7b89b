"""Shared fixtures. Tests run as root on a BPF-capable kernel (CI does); the
network tests build their own namespaces and remove them, also on failure."""

from __future__ import annotations

import logging
import os

import pytest

from pcn_lab.topology import Lab


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.exit("pcn tests load eBPF programs and build network namespaces: run them as root "
                    "(sudo make test)", returncode=2)


@pytest.fixture(scope="module")
def lab():
    """Two nodes with two pods each, torn down after the module."""
    with Lab(nodes_count=2, pods_per_node=2) as built:
        yield built
    assert built.leftovers() == [], f"teardown left {built.leftovers()}"
