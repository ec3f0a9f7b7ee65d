"""`make bench`: framework overhead, the data pipeline, scaling and sweep overhead, measured on the CPU.

`python -m rewiring bench --out benchmarks` calls `benchmarks.run.run_benchmarks`, which writes
`results.md` (tables and what they mean) and `results.json` (every raw figure).
"""
