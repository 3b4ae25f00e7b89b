"""The agent's local API, its protocol and client: how the CNI plugin asks the node agent to attach and
detach pods, without any BPF work on the plugin's side.

Transport: a unix stream socket (mode 0600, root peers only, checked again
with SO_PEERCRED), one JSON request line and one JSON response line per
connection:

    -> {"op": "attach", "container_id": "...", "netns": "/var/run/netns/x",
        "ifname": "eth0", "host_ifname": "pcn1a2b3c4d", "ip": "10.244.1.5/24",
        "mac": "..", "mtu": 1450, "k8s_namespace": "default", "k8s_name": "web-0"}
    <- {"ok": true, "container_id": "...", "port": "pod-...", "attached": true}
    <- {"ok": false, "error": "what went wrong and what to do", "code": 7}

Error codes are CNI's well-known ones, so the plugin can hand them on
unchanged. Ops: attach, detach, check, status, gc (see DataplaneHandler).
"""
from __future__ import annotations

import _socket  # not socket: its enums cost the plugin ~1.5 ms a run
import json
import os

from pcn_agent.cni.spec import DECODE_FAILURE, INTERNAL, TRY_AGAIN_LATER

TYPE_CHECKING = False  # the plugin imports this module on every run: no typing at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Request = dict[str, Any]
    Response = dict[str, Any]

MAX_LINE = 1 << 20  # a request or response line is at most 1 MiB


class LocalApiError(Exception):
    """Base of what `call` raises."""

    code = INTERNAL


class AgentUnavailable(LocalApiError):
    """Nobody serves the socket: the agent is not running (or not yet)."""

    code = TRY_AGAIN_LATER


class AgentTimeout(LocalApiError):
    """The agent accepted the connection but did not answer in time."""

    code = TRY_AGAIN_LATER


class AgentError(LocalApiError):
    """The agent answered {"ok": false}."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def call(path: str | os.PathLike[str], request: Request, timeout: float = 10.0,
         progress: Callable[[str], None] | None = None) -> Response:
    """Send one request, return the agent's successful response. Raises
    AgentUnavailable (no socket, refused), AgentTimeout, or AgentError.
    With `progress`, the agent may send {"progress": TEXT} lines before its
    answer (a streaming op such as `flows` does while the data plane is
    busy): each goes to `progress`, and `timeout` (seconds) applies to each
    line, not to the whole wait."""
    path = os.fspath(path)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise AgentUnavailable(
                f"no pcn agent socket at {path}: is the pcn agent running on this node, "
                f"serving that path (its PCN_SOCKET setting)?") from None
        except ConnectionRefusedError:
            raise AgentUnavailable(
                f"the pcn agent socket {path} refused the connection: the agent that made it is "
                f"gone; check that the pcn agent is running on this node") from None
        except PermissionError:
            raise AgentUnavailable(
                f"permission denied on the pcn agent socket {path}: only root may use it") from None
        except TimeoutError:
            raise AgentTimeout(f"connecting to the pcn agent at {path} took more than "
                               f"{timeout:g} s: the agent is overloaded or stuck") from None
        except OSError as exc:
            raise AgentUnavailable(f"cannot connect to the pcn agent at {path}: {exc}") from None
        try:
            sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
            reader = _LineReader(sock)
            line = reader.line()
            while progress is not None and _progress_text(line) is not None:
                progress(str(_progress_text(line)))
                line = reader.line()
        except TimeoutError:
            raise AgentTimeout(f"the pcn agent at {path} did not answer {request.get('op')!r} "
                               f"within {timeout:g} s: the agent is overloaded or stuck; check "
                               f"its log") from None
        except ValueError as exc:
            raise AgentError(f"the pcn agent at {path} answered too much: {exc}",
                             DECODE_FAILURE) from None
        except OSError as exc:
            raise AgentUnavailable(f"the pcn agent at {path} dropped the connection: {exc}") \
                from None
    finally:
        sock.close()
    if not line:
        raise AgentUnavailable(f"the pcn agent at {path} closed the connection without an "
                               f"answer; check its log")
    try:
        response = json.loads(line)
    except ValueError:
        raise AgentError(f"the pcn agent at {path} answered something that is not JSON: "
                         f"{line[:200]!r}", DECODE_FAILURE) from None
    if not isinstance(response, dict):
        raise AgentError(f"the pcn agent at {path} answered a non-object", DECODE_FAILURE)
    if not response.get("ok"):
        raise AgentError(str(response.get("error") or "the pcn agent refused the request"),
                         int(response.get("code") or INTERNAL))
    return response


def _progress_text(line: bytes) -> str | None:
    """The TEXT of a {"progress": TEXT} line (no "ok"), else None."""
    if not line.startswith(b'{"progress"'):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "ok" in obj:
        return None
    return str(obj.get("progress"))


class _LineReader:
    """Lines of a socket, keeping what it read past each one (read_line
    reads whole chunks, so a second line may come in the first's)."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise ValueError(f"line longer than {MAX_LINE} bytes")
        out, _, self.buf = self.buf.partition(b"\n")
        return out


def read_line(sock: _socket.socket) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_LINE:
            raise ValueError(f"line longer than {MAX_LINE} bytes")
    return bytes(buf.split(b"\n", 1)[0])
