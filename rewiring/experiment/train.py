"""The training entry: LightningCLI for fit, validate, test and predict, with the project's defaults.

`RewiringCLI` runs in subclass mode (the model and the data module are picked by `class_path` in the
YAML) and adds two arguments of its own: `convergence` (the ConvergenceCallback's settings, found by
the group's name, not by its place in `trainer.callbacks`) and `test_json` (a fit tests its best
checkpoint in its own process; a test writes its metrics there). `cli_main(args)` is callable from
tests. The console filters it installs (`LightningNoise`, `frozen_eval_modules`) live here too.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_module, rank_zero_only

from rewiring.convergence import ConvergenceCallback, TestResults

# ---------------------------------------------------------------------------- what the console shows
_TIP = re.compile(r"💡 Tip: .*\[(litlogger|litmodels)\]")
_OVERRIDE = re.compile(
    r"The following callbacks returned in `LightningModule.configure_callbacks` will override existing "
    r"callbacks passed to Trainer: (?P<names>.*)$"
)


class LightningNoise(logging.Filter):
    """Drops two kinds of Lightning info lines: the advertising tips for its cloud logger and model
    registry, and the notice that a module's `configure_callbacks` replaced a callback when the one
    replaced is Lightning's own default (every task returns its ModelCheckpoint). The notice stays
    when it replaces a callback the config names: that one is news. Everything else passes."""

    def __init__(self, configured: set[str] | None = None) -> None:
        super().__init__()
        self.configured = set(configured or ())  # class names of the config's trainer.callbacks

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _TIP.search(message):
            return False
        override = _OVERRIDE.search(message)
        if override:
            names = {n.strip() for n in override.group("names").split(",")}
            return bool(names & self.configured)
        return True


@contextmanager
def quiet_lightning(noise: LightningNoise) -> Iterator[None]:
    """`noise` on Lightning's info logger, and a scope for warning filters, for one CLI run."""
    log = rank_zero_module.log
    log.addFilter(noise)
    try:
        with warnings.catch_warnings():
            yield
    finally:
        log.removeFilter(noise)


def frozen_eval_modules(model: torch.nn.Module) -> int | None:
    """How many modules are in eval mode, when each lies in a frozen part (a module in eval mode
    whose parameters, all of them, are frozen, such as the SUPERB protocol's encoder): Lightning's
    "Found N module(s) in eval mode" is then about what was intended. None when nothing is in eval
    mode, or something is that still trains or has no parameters (a head's dropout left in eval)."""
    modules = dict(model.named_modules())
    evals = [name for name, m in modules.items() if not m.training]
    if not evals:
        return None
    for name in evals:
        parent = name.rpartition(".")[0]
        if name and not modules.get(parent, model).training:
            continue  # inside an eval part checked at its top
        params = list(modules[name].parameters())
        if not params or any(p.requires_grad for p in params):
            return None
    return len(evals)


def _is_convergence(callback: Any) -> bool:
    cls = _class(getattr(callback, "class_path", ""))
    return cls is not None and issubclass(cls, ConvergenceCallback)


def _class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


# ---------------------------------------------------------------------------- run folders
_FOLDER_LOGGERS = ("TensorBoardLogger", "CSVLogger")  # save_dir/name/version[/sub_dir]


def _logger_args(config: Any) -> Any:
    """The init_args of the run's (first) logger when it is one whose folder we can name, else None."""
    logger = config.trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if logger is None or isinstance(logger, bool) or not hasattr(logger, "class_path"):
        return None
    if logger.class_path.rsplit(".", 1)[-1] not in _FOLDER_LOGGERS or logger.get("init_args") is None:
        return None
    return logger.init_args


def _version_dir(init: Any, version: str | int) -> Path:
    root = Path(str(init.get("save_dir") or "."))
    if init.get("name"):
        root = root / str(init.get("name"))
    folder = root / (version if isinstance(version, str) else f"version_{version}")
    return folder / str(init.get("sub_dir")) if init.get("sub_dir") else folder


def _resumes(ckpt_path: str | None, run_dir: Path) -> bool:
    """Whether a fit's `ckpt_path` continues the run in `run_dir` (its checkpoint, or Lightning's "last")."""
    if not ckpt_path:
        return False
    if ckpt_path in ("last", "hpc"):
        return True
    return Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())


class RewiringCLI(LightningCLI):
    """LightningCLI with the project's defaults: subclass mode, config saved into the run folder.

    Run folders: a rewiring run is named after its pairing (`rewire/twin`) when the config leaves
    the logger's version unset, and a fit that would start over in a folder holding an earlier
    run's config.yaml goes to a new folder beside it (`twin_1`), so no run's config is overwritten;
    a fit resumed from that folder's checkpoint stays in it. The console: Lightning's cloud tips,
    its notice that a task replaced the default checkpoint callback, and its eval-mode warning for a
    frozen encoder are left out (`LightningNoise`, `frozen_eval_modules`); other warnings stay.

    The ConvergenceCallback is a group of its own (`convergence:` in conf/base.yaml,
    `--convergence.reference_run=...` on the command line; Lightning adds the callback to the
    trainer after `trainer.callbacks`), so its settings reach it wherever the callbacks list puts
    anything. A config that still lists it in `trainer.callbacks` (a run folder's config.yaml saved
    before the group existed) keeps working: that entry is folded into the group, one callback.
    """

    def __init__(self, args=None, run: bool = True, **kwargs):
        # Overwriting is decided here (before_instantiate_classes), not by SaveConfigCallback.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        self.noise = LightningNoise()
        with quiet_lightning(self.noise):
            super().__init__(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                run=run,
                auto_configure_optimizers=False,
                **kwargs,
            )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        callbacks = config.trainer.get("callbacks") or []
        if config.trainer.get("enable_progress_bar") is False:
            # conf/base.yaml names the project's bar; Lightning refuses a bar with the flag off
            callbacks = [
                c
                for c in callbacks
                if not issubclass(_class(getattr(c, "class_path", "")) or object, ProgressBar)
            ]
            config.trainer.callbacks = callbacks
        if any(_is_convergence(c) for c in callbacks):
            callbacks = self._fold_convergence(config, callbacks)
        self.noise.configured = {
            c.class_path.rsplit(".", 1)[-1] for c in callbacks if hasattr(c, "class_path")
        } | {ConvergenceCallback.__name__}
        init = _logger_args(config)
        if init is None:
            return
        data = config.get("data")
        pairing = (
            data.get("init_args", {}).get("pairing") if data is not None and hasattr(data, "get") else None
        )
        ckpt = config.get("ckpt_path")
        if self.subcommand == "fit" and ckpt and init.get("version") is None:
            # resuming an auto-numbered run (`version_3/checkpoints/last.ckpt`): stay in its folder
            folder = Path(ckpt).resolve().parent.parent
            if folder.parent == _version_dir(init, "x").parent.resolve():
                init.version = folder.name
        if init.get("version") is None and pairing:
            init.version = str(pairing)
        if self.subcommand == "fit" and init.get("version") is not None and rank_zero_only.rank == 0:
            self._fresh_run_folder(init, config.get("ckpt_path"))

    @staticmethod
    def _fold_convergence(config: Any, callbacks: list) -> list:
        """A ConvergenceCallback listed in `trainer.callbacks` becomes the `convergence` group: its
        arguments fill what the group leaves at the defaults, and the entry leaves the list."""
        defaults = {
            k: p.default for k, p in inspect.signature(ConvergenceCallback).parameters.items()
        }
        for entry in (c for c in callbacks if _is_convergence(c)):
            for key, value in vars(entry.get("init_args") or Namespace()).items():
                if config.convergence.get(key) == defaults.get(key):
                    config.convergence[key] = value
        config.trainer.callbacks = [c for c in callbacks if not _is_convergence(c)]
        return config.trainer.callbacks

    @staticmethod
    def _fresh_run_folder(init: Any, ckpt_path: str | None) -> None:
        """A new fit never overwrites an earlier run's config.yaml: it gets the next free folder."""
        version = init.version
        folder = _version_dir(init, version)
        if not (folder / "config.yaml").exists() or _resumes(ckpt_path, folder):
            return
        k = 1
        while True:
            new = f"{version}_{k}" if isinstance(version, str) else version + k
            if not _version_dir(init, new).exists():
                break
            k += 1
        init.version = new
        print(
            f"{folder} holds an earlier run (its config.yaml); this one goes to {_version_dir(init, new)}. "
            f"To resume that run instead: --config {folder / 'config.yaml'} --ckpt_path "
            f"{folder / 'checkpoints' / 'last.ckpt'}; to name this one: --trainer.logger.init_args.version=NAME",
            flush=True,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ConvergenceCallback, "convergence")
        parser.add_argument(
            "--test_json",
            type=str | None,
            default=None,
            help="fit: test the best checkpoint in this process after fitting (one device only; "
            "under DDP nothing is tested) and write the test metrics to this JSON file. The sweep "
            "sets it, which saves a test process per run. test: write the test metrics to this "
            "JSON file (a run's saved config.yaml carries its fit's value).",
        )

    def after_fit(self) -> None:
        """`--test_json`: the best checkpoint on the test set, in this process, as the sweep's test
        process would (one device, the run's own logger), so a run is one process, not two."""
        path = self.config.fit.get("test_json")
        cb = self.trainer.checkpoint_callback
        if not path or self.trainer.world_size != 1 or self.trainer.interrupted or cb is None:
            return
        ckpt = getattr(cb, "best_model_path", "") or getattr(cb, "last_model_path", "")
        if not ckpt:
            return  # no checkpoint to test; the sweep's test step says so
        self.trainer.callbacks.append(TestResults(path))
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)

    def before_test(self) -> None:
        """`--test_json` on `test`: the metrics to that file, as a fit's own test writes them."""
        path = self.config.test.get("test_json")
        if path:
            self.trainer.callbacks.append(TestResults(path))

    def before_fit(self) -> None:
        n = frozen_eval_modules(self.model)
        if n is not None:  # the frozen encoder is meant to be in eval mode; any other count still warns
            warnings.filterwarnings(
                "ignore", message=rf"Found {n} module\(s\) in eval mode at the start of training"
            )


def cli_main(args: list[str] | None = None, run: bool = True) -> RewiringCLI:
    """The training entry, callable from tests (`args` as on the command line, without `python -m`)."""
    return RewiringCLI(args=args, run=run)
