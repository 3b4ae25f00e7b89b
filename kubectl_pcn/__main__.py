"""`python -m kubectl_pcn` is `kubectl-pcn`."""

from kubectl_pcn.cli import main

main()
