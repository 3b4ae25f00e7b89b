"""The agent's own list+watch (control.watch.ListWatch) against a scripted
API: pages, events, bookmarks, an expired resourceVersion. No server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pcn_agent.control.kube import ApiError
from pcn_agent.control.watch import ListWatch


def _obj(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "a", "name": name, "resourceVersion": rv}}


class _Kube:
    """LIST in two pages; the first watch gives events then an expired
    version (ERROR 410), the second a 410 status, the third a bookmark and
    ends the test."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.watches = 0
        self.done = asyncio.Event()

    async def request(self, method: str, path: str) -> dict[str, Any]:
        self.requests.append(path)
        if "continue=" not in path:
            return {"metadata": {"resourceVersion": "10", "continue": "c1"},
                    "items": [_obj("x", "5")]}
        return {"metadata": {"resourceVersion": "10"}, "items": [_obj("y", "6")]}

    async def watch(self, path: str, read_timeout: float) -> AsyncIterator[dict[str, Any]]:
        self.requests.append(path)
        self.watches += 1
        if self.watches == 1:
            yield {"type": "MODIFIED", "object": _obj("x", "11")}
            yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}
            yield {"type": "DELETED", "object": _obj("y", "13")}
            yield {"type": "ERROR", "object": {"code": 410, "message": "too old"}}
        elif self.watches == 2:
            raise ApiError(410, "Gone")
        else:
            self.done.set()
            await asyncio.sleep(3600)
            yield {}


def test_list_then_watch_then_list_again_when_expired() -> None:
    kube = _Kube()
    seen: list[tuple[str | None, str]] = []
    lists: list[list[str]] = []
    lw = ListWatch(kube, "/api/v1/services", "Service",  # type: ignore[arg-type]
                   lambda t, o: seen.append((t, o["metadata"]["name"])),
                   lambda items: lists.append([o["metadata"]["name"] for o in items]))

    async def go() -> None:
        task = asyncio.create_task(lw.run())
        await asyncio.wait_for(kube.done.wait(), 10)
        task.cancel()

    asyncio.run(go())
    assert lists == [["x", "y"]] * 3  # first LIST, then one after each expiry
    assert seen == [("MODIFIED", "x"), ("DELETED", "y")]
    assert lw.synced.is_set() and lw.lists == 3
    watches = [r for r in kube.requests if "watch=true" in r]
    assert "resourceVersion=10" in watches[0] and "allowWatchBookmarks=true" in watches[0]
    assert all("limit=500" in r for r in kube.requests if "watch" not in r)
