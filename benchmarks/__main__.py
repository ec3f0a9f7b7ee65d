"""`python -m benchmarks`: the bench sections, measured, into results.md and results.json (make bench).

Run it from the source checkout's root: benchmarks/ is not installed with the package (the product
imports nothing from it). `rewiring bench` runs this command there. Its arguments come from
`bench`'s signature (jsonargparse), as every rewiring command's do.
"""

from __future__ import annotations

from benchmarks.run import SECTIONS, run_benchmarks


def bench(out: str = "benchmarks", quick: bool = False, sections: list[str] | None = None) -> None:
    """Measure framework overhead, the data pipeline, scaling, sweep overhead, (with CUDA) the GPU step and the feature cache.

    Args:
        out: folder for results.md and results.json.
        quick: fewer repeats (a smoke run, not for reporting).
        sections: some of overhead, pipeline, scaling, sweep, gpu, features (default: all; gpu is
            skipped without a CUDA device).
    """
    run_benchmarks(out=out, quick=quick, sections=tuple(sections) if sections else SECTIONS)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    CLI(bench, args=argv, prog="python -m benchmarks", as_positional=True)


if __name__ == "__main__":
    main()
