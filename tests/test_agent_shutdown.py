"""The agent's shutdown (SIGTERM, a DaemonSet rolling update): kopf runs the
cleanup handlers, then waits 5 s for every task still running before it
cancels them as hung. The agent's own tasks (reconcile loop, heartbeat) must
be over by then, or every orderly restart takes 5 s longer with the local API
already gone (found by the restart soak, bench.soak)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

import kopf
import pytest

from pcn_agent.control import agent as agent_mod
from pcn_agent.control.settings import ClusterSettings


class _Kube:
    """What the agent's loops may call, answering nothing."""

    def __init__(self) -> None:
        self.closed = False

    async def request(self, *args: Any, **kw: Any) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


def test_cleanup_leaves_no_task_of_the_agent_running(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCN_METRICS_PORT", "0")
    kube = _Kube()
    agent = agent_mod.Agent("n1", ClusterSettings(), kube, state_root=tmp_path)  # type: ignore[arg-type]
    agent._prepared = concurrent.futures.Future()  # no data plane: no Node object comes
    monkeypatch.setattr(agent_mod, "AGENT", agent)

    async def startup_then_cleanup() -> list[asyncio.Task[Any]]:
        me = asyncio.current_task()
        await agent_mod.startup(settings=kopf.OperatorSettings())
        for _ in range(5):  # the loops reach their waits
            await asyncio.sleep(0)
        started = [t for t in asyncio.all_tasks() if t is not me]
        # the reconcile loop, the heartbeat and the watches of agent.WATCHED
        assert len(started) == 2 + len(agent_mod.WATCHED), started
        await agent_mod.cleanup()
        return [t for t in asyncio.all_tasks() if t is not me]

    # What kopf would then wait 5 s for and cancel as hung:
    assert asyncio.run(startup_then_cleanup()) == []
    assert kube.closed
