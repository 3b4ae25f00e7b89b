"""python -m pcn_agent.cni: the plugin, as pcn-cni runs it."""

from pcn_agent.cni.commands import main

main()
