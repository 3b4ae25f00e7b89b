"""The control plane of a node: the kopf agent and its command line, the pure
reconciler (objects in, plan out), the data-plane manager that applies plans,
Kubernetes client helpers, metrics, settings and the local API server."""
