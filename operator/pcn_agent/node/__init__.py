"""The node: wiring of the default topology (bridge, router, lbrp, dispatcher,
VXLAN, host link), pod plumbing and the stdlib-only rtnetlink client the CNI
plugin shares. Built on pcn_agent.dataplane."""
