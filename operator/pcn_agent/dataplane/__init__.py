"""The data plane: BCC compilation, the cube runtime (program array, slots, tc
attachment), pinned maps and their ctypes mirrors, the slow path, and
`cubes/` (one module per cube type). Imports nothing above it but pcn_crds."""
