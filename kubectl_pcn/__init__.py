"""kubectl-pcn: the `kubectl pcn` plugin. Puts cubes (NetworkFunctions) into
pods' chains (CubeChains) and shows what every node's agent realised."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("pcn")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
