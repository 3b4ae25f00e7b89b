"""pcn-lab: a whole cluster on one machine (emulated API server and its proxy,
kubelet stand-in, node and pod topology, connectivity checks, traffic probe,
demo). Uses pcn_agent; nothing in pcn_agent imports it."""
