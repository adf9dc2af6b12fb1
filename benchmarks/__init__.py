"""Tooling beside the service: benchmarks, load and soak clients, a peer server; uses server, never used by it."""
