"""Benchmarks of the orchestrator and growth_ops packages (not part of the installed package).

Run each one as a module from the repository root, e.g. `python -m bench.throughput --help`;
each prints a table and writes bench/results/<name>.json. See README.md, "Benchmarks".
"""
