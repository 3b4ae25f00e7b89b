"""pcn node agent: the data plane (dataplane/), the node wiring (node/), the
control plane (control/) and the CNI plugin (cni/); ARCHITECTURE.md draws them."""
