"""`make bench`: framework overhead, the data pipeline, scaling and sweep overhead, measured on the CPU.

`python -m benchmarks --out benchmarks` (benchmarks/__main__.py; `rewiring bench` runs it from the
source checkout) calls `benchmarks.run.run_benchmarks`, which writes
`results.md` (tables and what they mean) and `results.json` (every raw figure).
"""
