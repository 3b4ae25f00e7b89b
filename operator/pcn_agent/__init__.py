"""pcn node agent: the eBPF cube runtime, the cubes' control code and node wiring."""
