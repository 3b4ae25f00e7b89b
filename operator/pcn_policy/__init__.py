"""Network policy semantics, pure and shared: what NetworkPolicy
(networking.k8s.io/v1) and ClusterNetworkPolicy (policy.networking.k8s.io
v1alpha2) mean for one pod. `rules` is the compiled form the node's policy
cube enforces; `compiler` turns API objects into it and answers "would A
reach B on P, and by which rule" for `kubectl pcn policy`. Standard library
only: the agent's control plane and data plane and the kubectl plugin import
it."""
