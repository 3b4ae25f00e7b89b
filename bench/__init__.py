"""pcn benchmarks: `make bench` (or `python -m bench.run`).

Measures pcn against reference topologies built from plain kernel parts
(a veth pair, the reference CNI bridge plugin) on the same machine and in the
same run, and merges the numbers into bench/results/latest.json.
"""
