"""The real-cluster lab: upstream Kubernetes, etcd, containerd and CoreDNS
built from the Go module proxy (`make k8s`), run as a multi-node cluster on
one machine, one network and mount namespace per node."""
