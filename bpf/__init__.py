"""eBPF C sources of the pcn cubes, shipped with the agent and compiled by BCC at run time."""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = SOURCE_DIR / "include"

# Sources that are not cubes: cgroup programs the agent attaches itself
# (pcn_agent.dataplane.socklb), never loaded into the cube chain.
SOCKET_PROGRAMS = frozenset({"sock_lb"})
