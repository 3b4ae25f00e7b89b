"""pcn-cni's entry point, in two ways:

* `python -m pcn_agent.cni`, with the package importable as usual;
* `python -I -S /path/to/pcn_agent/cni/__main__.py`, the fast start the lab's
  kubelet stand-in and the image's CNI bundle use: -S skips site (the
  virtualenv's .pth files, the editable install's import hook: ~10 ms a run)
  and -I the user's PYTHON* variables; the package's root, found from this
  file's path, goes first on sys.path instead.

The time of entry (time.monotonic(), s) is handed to main() for
PCN_CNI_TRACE (see pcn_agent.cni.commands.main)."""

import time

_ENTERED = time.monotonic()

if not __package__:  # run as a file: put the directory holding pcn_agent/ first
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from pcn_agent.cni.commands import main  # noqa: E402

main(entered=_ENTERED)
