"""Benchmarks: workloads, offline throughput, online serving client, metrics and reports."""
