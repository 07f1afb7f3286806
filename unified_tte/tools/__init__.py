"""Tools that use the whole package: `tte bench` (bench.py), the embed-stage training benchmark
(train_bench.py) and `tte demo` (demo.py)."""
