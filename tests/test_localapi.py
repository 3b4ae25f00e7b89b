"""The agent's local API without a kernel data plane: framing, errors, the
socket's permissions and life cycle, the client's exceptions."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pcn_agent.cni import localapi, spec
from pcn_agent.cni.localapi import AgentError, AgentTimeout, AgentUnavailable
from pcn_agent.control.localapi import ApiError, DataplaneHandler, LocalApiServer


def _echo(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("op") == "fail":
        raise ApiError("told to fail", 7)
    if request.get("op") == "boom":
        raise ValueError("a bug")
    if request.get("op") == "sleep":
        time.sleep(float(request.get("s", 1)))
    return {"echo": request}


def _raw(path: Path, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        return json.loads(localapi.read_line(s))  # the client's own reader


@pytest.fixture
def server(tmp_path: Path):
    srv = LocalApiServer(tmp_path / "run" / "agent.sock", _echo).start()
    yield srv
    srv.stop()
    assert not srv.path.exists()


def test_round_trip(server: LocalApiServer) -> None:
    req = {"op": "status", "x": [1, "two"]}
    assert localapi.call(server.path, req, timeout=5) == {"ok": True, "echo": req}


def test_socket_is_root_only(server: LocalApiServer) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_non_root_peer_is_refused_by_peer_credentials() -> None:
    # A directory anyone may enter and a socket file anyone may open: only
    # SO_PEERCRED stands between an unprivileged client and the API.
    tmp = Path(tempfile.mkdtemp(prefix="pcn-localapi-"))
    try:
        os.chmod(tmp, 0o755)
        with LocalApiServer(tmp / "agent.sock", _echo) as srv:
            os.chmod(srv.path, 0o666)
            script = ("import socket,sys\n"
                      "s=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM);s.settimeout(5)\n"
                      "s.connect(sys.argv[1]);s.sendall(b'{\"op\":\"status\"}\\n')\n"
                      "print(s.recv(65536).decode())\n")
            proc = subprocess.run(["/usr/bin/python3", "-c", script, str(srv.path)],
                                  user=65534, group=65534, capture_output=True, text=True,
                                  timeout=20, check=False)
    finally:
        shutil.rmtree(tmp)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] is False
    assert "root only" in answer["error"] and "uid 65534" in answer["error"]


def test_request_that_is_not_json(server: LocalApiServer) -> None:
    answer = _raw(server.path, b"attach please\n")
    assert answer["ok"] is False and answer["code"] == spec.DECODE_FAILURE
    assert "not JSON" in answer["error"]
    answer = _raw(server.path, b"[1, 2]\n")
    assert answer["ok"] is False and answer["code"] == spec.DECODE_FAILURE


def test_handler_errors_become_error_responses(server: LocalApiServer) -> None:
    with pytest.raises(AgentError) as err:
        localapi.call(server.path, {"op": "fail"}, timeout=5)
    assert err.value.code == 7 and "told to fail" in str(err.value)
    answer = _raw(server.path, b'{"op": "boom"}\n')
    assert answer == {"ok": False, "code": 999, "error": "boom failed in the agent: a bug"}


def test_unknown_and_missing_op() -> None:
    handler = DataplaneHandler(SimpleNamespace())  # type: ignore[arg-type]
    with pytest.raises(ApiError) as err:
        handler({"op": "teleport"})
    assert err.value.code == spec.INTERNAL
    assert "unknown op 'teleport'" in str(err.value) and "attach" in str(err.value)
    with pytest.raises(ApiError) as err:
        handler({"container_id": "x"})
    assert err.value.code == spec.INVALID_ENV and "op" in str(err.value)


def test_unknown_op_over_the_socket(tmp_path: Path) -> None:
    handler = DataplaneHandler(SimpleNamespace())  # type: ignore[arg-type]
    with LocalApiServer(tmp_path / "a.sock", handler) as srv:
        answer = _raw(srv.path, b'{"op": "teleport"}\n')
    assert answer["ok"] is False and answer["code"] == 999
    assert "unknown op" in answer["error"]


def test_concurrent_clients(server: LocalApiServer) -> None:
    results: list[dict[str, Any]] = []
    errors: list[Exception] = []

    def one(i: int) -> None:
        try:
            results.append(localapi.call(server.path, {"op": "n", "i": i}, timeout=10))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r["echo"]["i"] for r in results) == list(range(32))


def test_client_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with pytest.raises(AgentUnavailable) as err:
        localapi.call(path, {"op": "status"}, timeout=1)
    assert str(path) in str(err.value) and "agent running" in str(err.value)
    assert err.value.code == spec.TRY_AGAIN_LATER


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens


def test_client_refused_on_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    _stale_socket(path)
    with pytest.raises(AgentUnavailable) as err:
        localapi.call(path, {"op": "status"}, timeout=1)
    assert "refused" in str(err.value)


def test_client_timeout(server: LocalApiServer) -> None:
    start = time.monotonic()
    with pytest.raises(AgentTimeout) as err:
        localapi.call(server.path, {"op": "sleep", "s": 1.5}, timeout=0.3)
    assert time.monotonic() - start < 1.2
    assert "did not answer" in str(err.value)


def test_stale_socket_is_replaced_and_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    _stale_socket(path)
    with LocalApiServer(path, _echo) as srv:
        assert localapi.call(path, {"op": "x"}, timeout=5)["ok"]
        with pytest.raises(RuntimeError, match="another process serves"):
            LocalApiServer(path, _echo).start()
        assert localapi.call(srv.path, {"op": "x"}, timeout=5)["ok"]  # still serving
    assert not path.exists()


def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    path.write_text("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        LocalApiServer(path, _echo).start()
    assert path.read_text() == "not a socket"


def test_stop_is_idempotent_and_restartable(tmp_path: Path) -> None:
    srv = LocalApiServer(tmp_path / "agent.sock", _echo)
    srv.stop()  # never started
    srv.start()
    srv.stop()
    srv.stop()
    assert not srv.path.exists()
    with pytest.raises(AgentUnavailable):
        localapi.call(srv.path, {"op": "x"}, timeout=1)
    srv.start()
    assert localapi.call(srv.path, {"op": "x"}, timeout=5)["ok"]
    srv.stop()


def _status_server(path: Path, ready: bool) -> threading.Thread:
    """A one-shot agent socket answering the status op."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            localapi.read_line(conn)
            conn.sendall(json.dumps({"ok": True, "node": "n1", "ready": ready,
                                     "pods": 0}).encode() + b"\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("ready", [True, False])
def test_agent_readiness_probe(tmp_path: Path, ready: bool,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """`pcn-agent --ready` (the DaemonSet's readiness probe) follows the data
    plane, not the process: a live agent that has not built it is not ready."""
    from pcn_agent.control import cli

    path = tmp_path / "agent.sock"
    t = _status_server(path, ready)
    assert cli.ready(str(path)) == (0 if ready else 1)
    t.join(5)
    if not ready:
        assert "has not built its data plane" in capsys.readouterr().err
    assert cli.ready(str(tmp_path / "none.sock")) == 1
