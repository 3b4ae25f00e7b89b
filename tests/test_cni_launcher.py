"""pcn-cni's C launcher and the agent's side of it (CniService) without a
lab: the answer framing, the burst-settled reconcile, and what the launcher
does with an agent that answers badly. tests/test_cni.py runs the launcher
and the Python plugin through the same CNI tests in a lab."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pcn_agent.control.localapi import CniService, LocalApiServer
from pcn_lab import kubelet

LAUNCHER = kubelet.cni_binary("launcher")
STATUS_CONF = {"cniVersion": "1.1.0", "name": "t", "type": "pcn", "ipam": {"type": "host-local"}}


def _status_handler(seen: list[bool], svc: list[CniService]) -> Any:
    def handle(request: dict[str, Any]) -> dict[str, Any]:
        assert request["op"] == "status"
        seen.append(svc[0].defer())  # asked from inside an invocation: deferred
        return {"node": "n1", "ready": True, "pods": 0}
    return handle


def test_cni_op_answers_in_frames_and_settles_once_per_burst() -> None:
    settled: list[int] = []
    seen: list[bool] = []
    holder: list[CniService] = []
    svc = CniService(_status_handler(seen, holder), None, settled=lambda: settled.append(1))
    holder.append(svc)
    assert svc.defer() is False  # nothing in flight: the caller reconciles now
    a, b = socket.socketpair()
    with a, b:
        svc({"op": "cni", "env": {"CNI_COMMAND": "STATUS"},
             "stdin": json.dumps(STATUS_CONF)}, a)
        a.shutdown(socket.SHUT_WR)
        answer = b.makefile("rb").read()
    head, _, rest = answer.partition(b"\n")
    assert head == b"PCNCNI1 0 0 0" and rest == b""
    assert seen == [True] and settled == [1]


def test_cni_op_refuses_a_malformed_request_in_cni_terms() -> None:
    svc = CniService(lambda r: {}, None)
    a, b = socket.socketpair()
    with a, b:
        svc({"op": "cni", "env": {"CNI_COMMAND": 1}, "stdin": "{}"}, a)
        a.shutdown(socket.SHUT_WR)
        answer = b.makefile("rb").read()
    head, _, rest = answer.partition(b"\n")
    word, status, out_n, err_n = head.split()
    assert (word, status, int(err_n)) == (b"PCNCNI1", b"1", 0)
    err = json.loads(rest[:int(out_n)])
    assert err["code"] == 6 and "env" in err["msg"]


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A socket answering every connection with the next of `answers`."""
    path = tmp_path / "fake.sock"
    answers: list[bytes] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    srv.settimeout(0.1)  # accept wakes up to see `stop`
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            with conn:
                conn.makefile("rb").readline()
                if answers:
                    conn.sendall(answers.pop(0))
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, answers
    stop.set()
    t.join(5)
    srv.close()


def _launch(sock: Path, command: str = "STATUS") -> tuple[int, dict[str, Any] | None, str]:
    conf = {**STATUS_CONF, "agentSocket": str(sock)}
    p = subprocess.run(LAUNCHER, input=json.dumps(conf).encode(),
                       env={"CNI_COMMAND": command, "PATH": "/usr/bin:/bin"},
                       capture_output=True, timeout=60, check=False)
    out = p.stdout.decode()
    return p.returncode, json.loads(out) if out.strip() else None, p.stderr.decode()


def test_launcher_relays_the_agents_answer(fake_agent: tuple[Path, list[bytes]]) -> None:
    sock, answers = fake_agent
    body = b'{"cniVersion": "1.1.0", "code": 50, "msg": "not ready"}\n'
    answers.append(b"PCNCNI1 1 %d 4\n" % len(body) + body + b"oops")
    rc, out, err = _launch(sock)
    assert (rc, out, err) == (1, json.loads(body), "oops")


def test_launcher_reports_a_cut_answer(fake_agent: tuple[Path, list[bytes]]) -> None:
    sock, answers = fake_agent
    answers.append(b"PCNCNI1 0 100 0\n{\"cniVersion\"")  # the agent died mid-answer
    rc, out, _ = _launch(sock, "ADD")
    assert rc == 1 and out is not None and out["code"] == 11
    assert "without a complete answer" in out["msg"] and str(sock) in out["msg"]


def test_launcher_falls_back_to_the_python_plugin(tmp_path: Path) -> None:
    """An agent that does not know the cni op (its local API error line), and
    no agent at all: the Python plugin answers, as it would alone."""
    sock = tmp_path / "old-agent.sock"
    with LocalApiServer(sock, lambda r: {"node": "n1", "ready": True, "pods": 0}):
        rc, out, _ = _launch(sock)
    assert (rc, out) == (0, None)  # STATUS through the old agent's status op
    rc, out, _ = _launch(sock)
    assert rc == 1 and out is not None and out["code"] == 50
    assert str(sock) in out["msg"]


def test_an_add_whose_netns_the_agent_cannot_see_goes_to_the_python_plugin(
        tmp_path: Path) -> None:
    """A CNI_NETNS path missing from the agent's mounts (a host whose
    /run/netns does not propagate into the agent's container): the agent
    answers with a local API error line naming the mount, on which the
    launcher runs the Python plugin (from the caller's mounts), here with
    the same missing path, so the plugin's own error comes back."""
    calls: list[dict[str, Any]] = []
    svc = CniService(lambda r: calls.append(r) or {}, None)
    unseen = str(tmp_path / "cni-gone")
    a, b = socket.socketpair()
    with a, b:
        svc({"op": "cni", "env": {"CNI_COMMAND": "ADD", "CNI_NETNS": unseen},
             "stdin": json.dumps(STATUS_CONF)}, a)
        a.shutdown(socket.SHUT_WR)
        answer = json.loads(b.makefile("rb").read())
    assert not answer["ok"] and unseen in answer["error"] and "HostToContainer" in answer["error"]
    assert calls == []  # nothing was done in the agent
    sock = tmp_path / "agent.sock"
    with LocalApiServer(sock, lambda r: {}, streams={"cni": svc}):
        conf = {**STATUS_CONF, "agentSocket": str(sock)}
        p = subprocess.run(LAUNCHER, input=json.dumps(conf).encode(),
                           env={"CNI_COMMAND": "ADD", "CNI_NETNS": unseen,
                                "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
                                "CNI_PATH": "/opt/cni/bin", "PATH": "/usr/bin:/bin"},
                           capture_output=True, timeout=60, check=False)
    out = json.loads(p.stdout)
    assert p.returncode == 1 and unseen in out["msg"], out  # the Python plugin's error
    assert "not visible to the agent" not in out["msg"]
