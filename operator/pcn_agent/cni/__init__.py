"""pcn-cni, the CNI plugin: spec parsing and errors, IPAM delegation, the pod
link, the commands, and the client of the agent's local API. Standard library
only (plus pcn_agent.node.rtnl): it ships in a bundle without pyroute2."""
