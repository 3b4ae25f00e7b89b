"""The API proxy the lab puts in front of the emulator (what kubectl and the
agents talk to): watches, discovery and the server-side Table format, as a
real API server serves them."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pcn_lab.apiproxy import ApiProxy
from pcn_lab.apiserver import EmulatedApiServer


class Proxied:
    """An emulator and the proxy in front of it, the proxy on a loop of its own."""

    def __init__(self) -> None:
        self.api = EmulatedApiServer().start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy: ApiProxy = self._run(ApiProxy(self.api.url).start())
        self.host, self.port = "127.0.0.1", self.proxy.port

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self._run(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.api.stop()

    def get(self, path: str, accept: str = "application/json", timeout: float = 10
            ) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Accept": accept})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()

    def watch(self, path: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request("GET", path + "?watch=true")
        r = conn.getresponse()
        assert r.status == 200
        return conn, r


@pytest.fixture
def proxied() -> Iterator[Proxied]:
    p = Proxied()
    try:
        yield p
    finally:
        p.close()


def established_to(port: int) -> int:
    """TCP connections on this machine, established, to 127.0.0.1:`port`."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[2].split(":")[1], 16) == port:
            n += 1
    return n


def test_a_closed_watch_lets_go_of_the_api_server(proxied: Proxied) -> None:
    """A client that goes away (an agent killed) takes its watches with it:
    the proxy closes what it held open to the API server for them."""
    upstream = urlsplit(proxied.api.url).port
    assert upstream is not None
    watches = [proxied.watch(f"/api/v1/namespaces/ns{i}/configmaps") for i in range(5)]
    assert established_to(upstream) >= 5
    for conn, r in watches:
        r.close()
        conn.close()
    deadline = time.monotonic() + 20
    while established_to(upstream) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert established_to(upstream) == 0


def test_many_watches_at_once_do_not_block_other_requests(proxied: Proxied) -> None:
    """A real API server does not count long-running requests (watches)
    against any limit of requests in flight: with 101 watches open (ten
    agents' worth), a GET still answers."""
    watches = [proxied.watch(f"/api/v1/namespaces/ns{i}/pods") for i in range(101)]
    try:
        status, body = proxied.get("/api/v1/namespaces/default/configmaps")
        assert status == 200 and body["items"] == []
    finally:
        for conn, r in watches:
            r.close()
            conn.close()
