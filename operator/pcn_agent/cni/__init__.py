"""pcn-cni, the CNI plugin: spec parsing and errors, IPAM delegation, the pod
link, the commands, the client of the agent's local API, and a small rtnetlink
client. Standard library only: it ships in a bundle without pyroute2."""
