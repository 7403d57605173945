"""Benchmarks: CLI commands that measure ours and a named baseline in one run and print the ratio."""
