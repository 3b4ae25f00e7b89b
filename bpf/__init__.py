"""eBPF C sources of the pcn cubes, shipped with the agent and compiled by BCC at run time."""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = SOURCE_DIR / "include"
