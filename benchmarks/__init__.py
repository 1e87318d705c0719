"""Side-by-side measurements; run all with `make bench` (python -m benchmarks)."""
