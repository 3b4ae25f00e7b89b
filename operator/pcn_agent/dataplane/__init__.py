"""The data plane: BCC compilation, the cube runtime (program array, slots, tc
attachment), pinned maps and their ctypes mirrors, the slow path, and
`cubes/` (one module per cube type). Of the project it imports only the layer
below it, pcn_crds (the firewall rule language), and pcn_bpf's C sources."""
