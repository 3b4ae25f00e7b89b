"""Test support: helpers that only tests and benchmarks use (BPF_PROG_TEST_RUN)."""
