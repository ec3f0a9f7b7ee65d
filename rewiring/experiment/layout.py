"""Run folders and their names: where a run lives, what state it is in, and which encoder it builds.

    <runs_dir>/<sweep>/<task>/<split>/<arm>/lr<lr>/seed<k>/   a fine-tuning run: the logger's
                                                            save_dir (<sweep>/<task>/<split>), name
                                                            (<arm>) and version (lr<lr>/seed<k>)
    <runs_dir>/<sweep>/rewire/<arm>/                        a rewiring stage
    <run>.lock                                              beside a run folder, held while it runs

A run folder holds config.yaml (LightningCLI), checkpoints/, TensorBoard events, convergence.json,
test.json (rewiring.convergence) and the fit.log/test.log outputs. A split is written as the sweep
spec gives it ("1%", "10min") and named on disk without the percent sign ("1pct").

The encoder a fit builds is read the way the fit reads it: its stacked configs and overrides parsed
by the project's own LightningCLI parser (`encoder_source`), or, for a run that has started, the
resolved config.yaml it saved (`saved_encoder_source`). Whether a source names a local folder is
`rewiring.encoder`'s rule (`is_local`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rewiring.files import read_json

BASELINE = "baseline"


# ---------------------------------------------------------------------------- splits and names
def parse_split(split: str) -> tuple[str, Any]:
    """("fraction", 0.01) for "1%", ("full", None) for "100%", ("amount", "10min") for an amount."""
    s = str(split).strip()
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            raise ValueError(f"split {split!r}: a percentage like '1%' or an amount like '10min'") from None
        if not 0 < pct <= 100:
            raise ValueError(f"split {split!r}: the percentage must be in (0, 100]")
        return ("full", None) if pct == 100 else ("fraction", pct / 100)
    from rewiring.manifest import parse_amount

    try:
        parse_amount(s)
    except ValueError as e:
        raise ValueError(f"split {split!r}: a percentage like '1%' or an amount like '10min' ({e})") from None
    return "amount", s


def split_dir(split: str) -> str:
    """A folder name for a split: "1%" -> "1pct", "10min" stays."""
    return str(split).strip().replace("%", "pct")


def split_label(split: str) -> str:
    """The folder name of a split back to how the sweep spec wrote it: "1pct" -> "1%"."""
    return split[:-3] + "%" if split.endswith("pct") else split


def split_sort_key(split: str) -> tuple[int, float]:
    """Amounts (by seconds) before fractions (by size): the order of the summary plot's x axis."""
    kind, value = parse_split(split_label(split))
    if kind == "amount":
        from rewiring.manifest import parse_amount

        return 0, parse_amount(value)
    return 1, 1.0 if kind == "full" else float(value)


def lr_dir(lr: float) -> str:
    return f"lr{lr:g}"


def run_dir(root: Path, task: str, split: str, arm: str, lr: float, seed: int) -> Path:
    """<root>/<task>/<split>/<arm>/lr<lr>/seed<seed>: the logger's save_dir/name/version of a run."""
    return Path(root) / task / split_dir(split) / arm / lr_dir(lr) / f"seed{seed}"


def rewire_log_dir(root: Path, arm: str) -> Path:
    """<root>/rewire/<arm>: the rewiring stage's logger folder."""
    return Path(root) / "rewire" / arm


def run_name_pattern() -> re.Pattern:
    """Run folders under a sweep root: <task>/<split>/<arm>[/lr<lr>]/seed<k> (the report reads these)."""
    return re.compile(
        r"^(?P<task>[^/]+)/(?P<split>[^/]+)/(?P<arm>[^/]+)(?:/lr(?P<lr>[^/]+))?/seed(?P<seed>\d+)$"
    )


def test_metric(dev_metric: str) -> str:
    """The test metric logged for a dev metric: val/acc -> test/acc."""
    return "test/" + dev_metric.split("/", 1)[-1]



# ---------------------------------------------------------------------------- run state
def is_complete(run_dir: Path) -> bool:
    return (run_dir / "convergence.json").exists() and (run_dir / "test.json").exists()


def lock_file(run_dir: Path) -> Path:
    """<run>.lock beside the run folder (it survives the folder's deletion on a restart): held by
    the sweep process while a fit or test of the run goes on."""
    return run_dir.with_name(run_dir.name + ".lock")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """last.ckpt if there is one, else the newest checkpoint."""
    ckpts = run_dir / "checkpoints"
    if (ckpts / "last.ckpt").exists():
        return ckpts / "last.ckpt"
    found = list(ckpts.glob("*.ckpt")) if ckpts.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The best checkpoint named in convergence.json, else the only non-last one, else last.ckpt."""
    conv = run_dir / "convergence.json"
    if conv.exists():
        best = (read_json(conv).get("checkpoint") or {}).get("best")
        if best:
            p = Path(best) if Path(best).is_absolute() else run_dir / best
            if p.exists():
                return p
    ckpts = run_dir / "checkpoints"
    others = [p for p in ckpts.glob("*.ckpt") if p.name != "last.ckpt"] if ckpts.is_dir() else []
    if others:
        return max(others, key=lambda p: p.stat().st_mtime)
    return latest_checkpoint(run_dir)


def run_state(run_dir: Path) -> str:
    """complete | test (fit done) | resume (killed with a checkpoint) | restart (killed before one) | new."""
    if is_complete(run_dir):
        return "complete"
    if (run_dir / "convergence.json").exists():
        return "test"
    if (run_dir / "config.yaml").exists() and latest_checkpoint(run_dir) is not None:
        return "resume"
    if run_dir.exists() and any(run_dir.iterdir()):
        return "restart"
    return "new"


# ---------------------------------------------------------------------------- the encoder of a fit
class EncoderSourceError(ValueError):
    """A fit's configs and arguments do not parse, so its encoder cannot be named."""


def _source(conf: Any) -> Any:
    try:
        return conf["model"]["init_args"]["encoder"]["init_args"]["source"]
    except (KeyError, TypeError):
        return None


def encoder_source(fit_args: Sequence[str]) -> Any:
    """The encoder `source` (a hub name, a folder or a config dict; None when the model has no
    encoder) that `python -m rewiring <fit_args>` would build: every config it stacks and every
    override, resolved by the project's own LightningCLI parser (`--print_config`, in this process).
    `fit_args` start with the subcommand ("fit", ...). Raises EncoderSourceError when they do not parse."""
    args = tuple(fit_args)
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    stamps = tuple((c, os.stat(c).st_mtime_ns if os.path.exists(c) else None) for c in configs)
    return _resolved(args, os.getcwd(), stamps)


@functools.lru_cache(maxsize=64)
def _resolved(args: tuple[str, ...], cwd: str, stamps: tuple) -> Any:
    """`encoder_source`, once per arguments, working folder and config files' modification times."""
    from rewiring.experiment.train import cli_main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main([*args, "--print_config"])
    except SystemExit as e:
        if e.code not in (0, None):
            why = err.getvalue().strip().splitlines()
            raise EncoderSourceError(why[-1] if why else f"the parser exited with {e.code}") from None
    return _source(yaml.safe_load(out.getvalue()) or {})


def saved_encoder_source(config_yaml: str | Path) -> Any:
    """The encoder `source` in the config.yaml a run saved (LightningCLI's resolved config, so one
    file says it all), or None."""
    try:
        return _source(yaml.safe_load(Path(config_yaml).read_text()) or {})
    except (OSError, yaml.YAMLError):
        return None


def is_local(source: Any) -> bool:
    """Whether an encoder source names a local folder, by `rewiring.encoder`'s rule: a path that
    exists, or a string shaped like a path (a hub id is "name" or "org/name"). A dict is a config."""
    if not isinstance(source, str) or not source:
        return False
    from rewiring.encoder import looks_like_path

    return Path(source).expanduser().exists() or looks_like_path(source)


def source_ready(source: Any) -> bool:
    """A hub name or a config dict is taken as it is; a local folder must hold an HF config.json."""
    return not is_local(source) or (Path(source).expanduser() / "config.json").exists()
