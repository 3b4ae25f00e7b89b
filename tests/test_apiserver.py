"""The emulated API server's request record: kept whole for tests that read
it, trimmed for long runs (a lab, a benchmark) so requests do not slow down."""

from __future__ import annotations

import time

import pytest

from pcn_lab.apiserver import EmulatedApiServer, apply, get


def _config_map(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"cm-{i}", "namespace": "default"}, "data": {"i": str(i)}}


def _record(api: EmulatedApiServer) -> int:
    return len(list(api.emulator))


def test_record_is_kept_whole_by_default() -> None:
    with EmulatedApiServer() as api:
        for i in range(30):
            apply(api, _config_map(i))
        assert _record(api) >= 30


def test_record_is_trimmed_and_objects_stay() -> None:
    with EmulatedApiServer(keep_requests=8) as api:
        for i in range(60):
            apply(api, _config_map(i))
        deadline = time.monotonic() + 5
        while _record(api) > 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _record(api) <= 8
        # trimming forgets requests, never objects
        assert get(api, "ConfigMap", "cm-0", "default")["data"] == {"i": "0"}
        assert get(api, "ConfigMap", "cm-59", "default")["data"] == {"i": "59"}


def test_keep_requests_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EmulatedApiServer(keep_requests=0)
