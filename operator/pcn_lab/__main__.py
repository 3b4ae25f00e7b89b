"""python -m pcn_lab: the pcn-lab command."""

import sys

from pcn_lab.cli import main

sys.exit(main())
