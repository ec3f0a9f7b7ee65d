"""The experiment layer: the CLI, the commands, run folders, the sweep and its report.

It drives the method below it (`rewiring.*` outside this package) and the tasks (`tasks.*`); nothing
below imports it. `benchmarks/` sits outside the product and is imported by nothing here:
`rewiring bench` runs `python -m benchmarks` in the source checkout.

    train.py     RewiringCLI (LightningCLI) and cli_main: fit, validate, test, predict
    cli.py       `python -m rewiring <command>`: the dispatch and its usage text
    commands.py  prepare, synthesize, isotropy, features, compare, bench, convert-whisper
    layout.py    run folders and their names, run states, checkpoints, a fit's encoder source
    sweep/       the grid: spec.py, commands.py (the processes), runners.py, slurm.py
    report/      compare: results.py (figures), plots.py, markdown.py + templates/
"""
