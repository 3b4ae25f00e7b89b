"""The state file of a real-cluster lab (``<lab dir>/cluster.json``): enough
for every `pcn-lab` command, and for `down` after a crash, to find the
cluster. Written first thing by `up`, and after every step."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pcn_lab.cluster.layout import DATA_ROOT, Layout

STATE_FILE = "cluster.json"


@dataclass
class ClusterState:
    dir: Path
    run_id: str
    workers: int
    data_root: str = str(DATA_ROOT)
    relay_port: int = 0
    holders: dict[str, int] = field(default_factory=dict)  # node -> holder pid
    step: str = ""  # the last step started
    ready: bool = False
    error: str = ""
    namespace: str = "default"  # the kubeconfig's namespace
    agent_source: str = ""  # a checkout mounted over the agent image's packages (--agent-source)
    created_mountpoints: list[str] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)  # before the kubelets changed them

    @property
    def layout(self) -> Layout:
        return Layout(self.run_id, self.workers, Path(self.data_root))

    @property
    def file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def alive(self, fresh_s: float = 600.0) -> bool:
        """Whether the cluster still runs: one of its node holders is alive,
        or, before it has any (an `up` in its first steps), its state was
        written in the last `fresh_s` seconds. A dead cluster's leftover
        state (a killed test run) is no heir of the host's mount points."""
        if self.holders:
            return any(_pid_alive(pid) for pid in self.holders.values())
        try:
            written = (self.layout.data / STATE_FILE).stat().st_mtime
        except OSError:
            return False
        return time.time() - written < fresh_s

    def save(self) -> None:
        """Write the state file, and a copy in the data folder (`down` finds a
        cluster whose lab folder is gone by it: see `orphans`)."""
        data = asdict(self)
        data["dir"] = str(self.dir)
        for f in (self.file, self.layout.data / STATE_FILE):
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(f)

    @classmethod
    def load(cls, d: Path) -> ClusterState | None:
        f = d / STATE_FILE
        if not f.is_file():
            return None
        data = json.loads(f.read_text())
        data.pop("dir", None)
        return cls(d, **data)


def orphans(data_root: Path = DATA_ROOT) -> list[ClusterState]:
    """Clusters whose data folder is still there, from its copy of the state
    (their lab folder may be gone: a reboot empties /run)."""
    found = []
    for f in sorted(data_root.glob(f"*/{STATE_FILE}")) if data_root.is_dir() else []:
        try:
            data = json.loads(f.read_text())
            d = Path(data.pop("dir"))
            found.append(ClusterState(d, **data))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
