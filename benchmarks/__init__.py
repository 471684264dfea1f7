"""Benchmarks: pytest-benchmark files (bench_*.py), the cases they share (cases_*.py) and the runner behind `python -m fastbb`."""
