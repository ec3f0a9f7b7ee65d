"""1. Framework overhead: the full Lightning path against a bare PyTorch loop, side by side.

Lightning path: `rewiring.experiment.train.cli_main(args, run=True)` with `--trainer.max_steps`, the project's
configs (conf/base.yaml + encoder + stage or task), its DataModule on a warm synthesis cache, the
Trainer with the configured logger and callbacks; a `StepTimer` callback stamps every step.
Bare loop: the same model class, loss, optimizer and data module (instantiated from the same
arguments with `run=False`), the batches pre-loaded into memory, then
`zero_grad; loss = f(batch); loss.backward(); step` and nothing else.

The two are interleaved step by step: right after Lightning's step k, in the same process, the bare
loop runs its step k on the same batch (its own copy of the model and optimizer), outside Lightning's
timing. A shared 2-core VM drifts by 10-20% over tens of seconds; run one after the other, that drift
moved the base-sized ratio between 0.93x and 1.21x from run to run, while steps a second apart see
the same machine.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from typing import Any

import torch

from benchmarks.common import Case, Workspace, batch_audio, batch_shape, log, ratio, steady, summarize
from benchmarks.timer import StepTimer, interleaved


def _cli(args: list[str], run: bool):
    from rewiring.experiment.train import cli_main

    return cli_main(args, run=run)


def _timer(trainer) -> StepTimer:
    for cb in trainer.callbacks:
        if isinstance(cb, StepTimer):
            return cb
    raise RuntimeError("StepTimer callback missing from the trainer")


# Actions that hold the interleaved bare steps (StepTimer.on_train_batch_end runs them, the epoch
# holds every callback): not Lightning's time, so left out of the profile table.
_HOLDS_BARE = ("StepTimer", "run_training_epoch")


def _profile_summary(profiler, n_steps: int, top: int = 14) -> list[dict[str, Any]]:
    """SimpleProfiler's actions by total time (nested actions overlap: run_training_batch holds the step)."""
    durations = getattr(profiler, "recorded_durations", {}) or {}
    rows = []
    for action, ds in durations.items():
        if any(h in action for h in _HOLDS_BARE):
            continue
        total = float(sum(ds))
        rows.append(
            {
                "action": action,
                "calls": len(ds),
                "total_s": total,
                "per_step_ms": 1000 * total / max(1, n_steps),
                "median_ms": 1000 * summarize(ds)["median"] if ds else None,
            }
        )
    rows.sort(key=lambda r: -r["total_s"])
    return rows[:top]


def _checkpoint_mb(trainer) -> float:
    """Megabytes of checkpoints the run wrote (its log folder)."""
    from pathlib import Path

    log_dir = trainer.log_dir
    if not log_dir:
        return 0.0
    return sum(p.stat().st_size for p in Path(log_dir).rglob("*.ckpt")) / 1e6


def run_lightning(ws: Workspace, case: Case, bare: dict[str, Any], *, profiler: bool = False) -> dict[str, Any]:
    """One `cli_main(run=True)` run of `case`; per-step and phase timings.

    Audio per step comes from the bare loop's batches (the same sampler seed gives the same batches
    in the same order; checked on their padded shapes, else the padded length is counted).
    """
    total = case.warmup + case.steps
    t_call_wall = time.time()
    t0 = time.perf_counter()
    cli = _cli(case.cli_args(ws, profiler=profiler, steps=total), run=True)
    t_end_wall = time.time()
    timer = _timer(cli.trainer)
    wall = time.perf_counter() - t0 - timer.between_seconds()  # less the interleaved bare steps
    n = len(timer.ends)
    same = [tuple(s) for s in timer.shapes] == [tuple(s) for s in bare["shapes"][:n]]
    if same:
        audio, source = bare["audio"][:n], bare["source"][:n]
    else:  # padded samples: an upper bound
        audio = [(s[0] * s[1] + (s[2] * s[3] if len(s) == 4 else 0)) / 16000 for s in timer.shapes]
        source = [s[0] * s[1] / 16000 for s in timer.shapes]
    w = max(0, case.warmup - 1)  # step_times()[j] is step j+1
    steps = steady(timer.step_times(), w)
    cpu = steady(timer.cpu_step_times(), w)
    st_audio = steady(audio[1:], w)
    st_source = steady(source[1:], w)
    stamps = timer.wall
    out = {
        "wall_s": wall,
        "steps_run": n,
        "audio_from": "bare batches (same shapes)" if same else "padded shapes",
        "audio_total_s": sum(audio),
        "source_total_s": sum(source),
        "step_s": summarize(steps),
        "cpu_step_s": summarize(cpu),
        "gap_s": summarize(steady(timer.gaps(), w)),
        "body_s": summarize(steady(timer.bodies(), case.warmup)),
        "first_step_s": (timer.ends[0] - timer.starts[0]) if timer.ends else None,
        "steady_audio_per_s": sum(st_audio) / sum(steps) if steps and sum(steps) else None,
        "steady_source_per_s": sum(st_source) / sum(steps) if steps and sum(steps) else None,
        "checkpoint_mb": _checkpoint_mb(cli.trainer),
        "phases_s": {
            # cli_main call -> Callback.setup: config parsing, instantiation, datamodule setup
            "parse_instantiate_setup": stamps.get("setup", t_call_wall) - t_call_wall,
            # setup -> on_train_start: model setup, optimizers, loops
            "fit_start": stamps.get("train_start", t_call_wall) - stamps.get("setup", t_call_wall),
            # on_train_start -> first batch: data-loader iterator, worker start, first batch
            "first_batch_wait": stamps.get("first_batch", t_call_wall) - stamps.get("train_start", t_call_wall),
            "loop": timer.timings()["loop_seconds"],
            # on_train_end -> cli_main returns: checkpoint, logger flush, teardown
            "teardown": t_end_wall - stamps.get("train_end", t_end_wall),
            "interleaved_bare": timer.between_seconds(),
        },
        "raw": {"steps": timer.step_times(), "cpu_steps": timer.cpu_step_times(), "gaps": timer.gaps(),
                "bodies": timer.bodies(), "shapes": [list(x) for x in timer.shapes]},  # fmt: skip
    }
    if profiler:
        out["profile"] = _profile_summary(cli.trainer.profiler, n)
    del cli
    gc.collect()
    return out


def _loss_fn(model, stage: str):
    if stage == "rewire":
        from rewiring.rewire import nt_xent

        def f(batch):
            z1 = model.embed(batch["view1"])
            z2 = model.embed(batch["view2"])
            return nt_xent(z1, z2, model.temperature)[0]

        return f
    return lambda batch: model.step(batch, "train")


def _usable(batch) -> bool:
    if batch is None:
        return False
    if isinstance(batch, dict):
        return batch.get("size", 0) >= 2
    return True


def _init_hparams(model) -> dict[str, Any]:
    """The module's saved init arguments (LightningCLI adds `_class_path` and the like).

    Task modules take their base class's arguments through `**kwargs`, so the names come from every
    `__init__` along the class's MRO, not from its own signature alone.
    """
    import inspect

    names: set[str] = set()
    for cls in type(model).__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names |= set(inspect.signature(init).parameters)
    keep = {k: v for k, v in model.hparams.items() if k in names and k not in ("self", "encoder", "optimizer")}
    return keep


def preload(dm, case: Case, model) -> list:
    """The first warm-up + steps usable training batches of a set-up data module, in the order a
    Lightning run with the same sampler seed sees them (loaded on the main process, untimed)."""
    dm.num_workers = 0
    if hasattr(dm, "set_frame_layout"):  # what the model's setup does in a fit: masks need the frame count
        dm.set_frame_layout(model.encoder.frame_layout)
    total = case.warmup + case.steps
    batches: list = []
    while len(batches) < total:
        before = len(batches)
        for batch in dm.train_dataloader():
            if _usable(batch):
                batches.append(batch)
            if len(batches) == total:
                break
        if len(batches) == before:
            raise RuntimeError(f"{case.name}: the data module gives no usable batch")
    return batches


def describe(batches: list) -> dict[str, list]:
    """Per batch: seconds of audio through the encoder, seconds of source audio, padded shape (what
    `run_lightning` pairs with its own steps)."""
    return {
        "audio": [batch_audio(b)[0] for b in batches],
        "source": [batch_audio(b)[1] for b in batches],
        "shapes": [batch_shape(b) for b in batches],
    }


class BareLoop:
    """The same model, loss, optimizer and batches in a plain loop (batches pre-loaded, untimed).

    `step(k, shape)` runs batch k; the bench calls it right after Lightning's step k (see `interleaved`),
    and records a mismatch when Lightning's batch k had another padded shape.
    """

    def __init__(self, ws: Workspace, case: Case) -> None:
        from rewiring.encoder import SpeechEncoder

        self.case = case
        cli = _cli(case.cli_args(ws)[1:], run=False)  # run=False takes no subcommand
        template, dm = cli.model, cli.datamodule
        # What a plain script pays before its first step: build the encoder, the module, the optimizer.
        torch.manual_seed(0)
        t0 = time.perf_counter()
        enc = template.encoder
        encoder = SpeechEncoder(enc.source, layers=enc.layers, freeze_feature_encoder=enc.freeze_feature_encoder)
        self.model = type(template)(encoder=encoder, optimizer=template.optimizer, **_init_hparams(template))
        dm.setup("fit")
        if case.stage != "rewire":
            self.model.install_spec(dm.spec)
        self.optimizer = self.model.configure_optimizers()
        self.build_s = time.perf_counter() - t0

        self.batches = preload(dm, case, template)
        self.loss_fn = _loss_fn(self.model, case.stage)
        self.described = describe(self.batches)
        self.reset()

    def reset(self) -> None:
        """Forget the timings (a new interleaved run)."""
        self.times: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.mismatched: list[int] = []

    def step(self, k: int, shape: tuple[int, ...] | None = None) -> None:
        """Batch k through zero_grad, loss, backward and the optimizer step, timed (wall and CPU)."""
        if k >= len(self.batches):
            return
        if shape is not None and tuple(shape) != tuple(self.described["shapes"][k]):
            self.mismatched.append(k)
        self.model.train()
        batch = self.batches[k]
        t, c = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(batch)
        loss.backward()
        self.optimizer.step()
        self.times[k] = time.perf_counter() - t
        self.cpu[k] = time.process_time() - c

    def summary(self) -> dict:
        """Per-step figures of the steps run since the last `reset()`."""
        w = self.case.warmup
        n = len(self.times)
        times = [self.times[k] for k in range(n)]
        cpu = [self.cpu[k] for k in range(n)]
        st = steady(times, w)
        params = list(self.model.parameters())
        return {
            "build_s": self.build_s,
            "steps_run": n,
            "audio_total_s": sum(self.described["audio"][:n]),
            "source_total_s": sum(self.described["source"][:n]),
            "loop_s": sum(times),
            "step_s": summarize(st),
            "cpu_step_s": summarize(steady(cpu, w)),
            "mismatched_batches": list(self.mismatched),
            "steady_audio_per_s": sum(steady(self.described["audio"][:n], w)) / sum(st),
            "steady_source_per_s": sum(steady(self.described["source"][:n], w)) / sum(st),
            "params_m": sum(p.numel() for p in params) / 1e6,
            "trainable_m": sum(p.numel() for p in params if p.requires_grad) / 1e6,
            "raw": {"steps": times, "cpu_steps": cpu},
        }


def paired(light_steps: list[float], bare_steps: list[float], warmup: int) -> list[tuple[int, float, float]]:
    """(k, Lightning, bare) seconds of the same step k. Lightning's intervals run batch end to batch
    end, so its j-th interval is step j+1; steps before `warmup` are left out."""
    out = []
    for j, lt in enumerate(light_steps):
        k = j + 1
        if warmup <= k < len(bare_steps) and bare_steps[k] > 0:
            out.append((k, lt, bare_steps[k]))
    return out


def order_ratios(pairs: list[tuple[int, float, float]]) -> dict[str, Any]:
    """Lightning / bare per step, split by which loop ran first on the batch, and their balance.

    "ratio" is the geometric mean of the two orders' medians: each loop pays for running first on a
    new batch shape in one half and not in the other, so the order's cost cancels out.
    """
    from benchmarks.timer import StepTimer

    first = {
        "bare_first": [lt / bt for k, lt, bt in pairs if StepTimer.bare_first(k)],
        "lightning_first": [lt / bt for k, lt, bt in pairs if not StepTimer.bare_first(k)],
    }
    out: dict[str, Any] = {name: summarize(v) for name, v in first.items()}
    meds = [out[name]["median"] for name in first if out[name]["median"] is not None]
    out["ratio"] = math.prod(meds) ** (1 / len(meds)) if meds else None
    out["all"] = summarize([lt / bt for _, lt, bt in pairs])
    return out


def measure(ws: Workspace, case: Case, *, profile: bool = False) -> dict[str, Any]:
    """The Lightning run with the bare loop's steps interleaved (then a shorter profiled run when
    `profile`), and the ratios (Lightning / bare: above 1 means Lightning is slower)."""
    log(f"overhead {case.name}: Lightning and the bare loop, interleaved ({case.warmup}+{case.steps} steps)")
    loop = BareLoop(ws, case)
    batches = loop.described
    with interleaved(loop.step):
        light = run_lightning(ws, case, batches)
    bare = loop.summary()
    out: dict[str, Any] = {"case": dict(case.__dict__), "bare": bare, "lightning": light}
    # Paired: Lightning's step k against the bare loop's step k (the same batch, a second apart), so
    # the different lengths of bucketed batches and the machine's drift cancel out.
    pairs = paired(light["raw"]["steps"], bare["raw"]["steps"], case.warmup)
    out["ratio_steady"] = order_ratios(pairs)
    out["ratio_steady_total"] = ratio(sum(lt for _, lt, _ in pairs), sum(bt for _, _, bt in pairs))
    out["ratio_steady_cpu"] = order_ratios(paired(light["raw"]["cpu_steps"], bare["raw"]["cpu_steps"], case.warmup))
    # End to end: seconds per audio-second, everything included (bare: model build + its steps).
    e2e_light = light["wall_s"] / light["audio_total_s"] if light["audio_total_s"] else None
    e2e_bare = (bare["build_s"] + bare["loop_s"]) / bare["audio_total_s"] if bare["audio_total_s"] else None
    out["ratio_end_to_end"] = ratio(e2e_light, e2e_bare)
    out["extra_per_step_ms"] = 1000 * sum(lt - bt for _, lt, bt in pairs) / len(pairs)
    out["gap_per_step_ms"] = 1000 * light["gap_s"]["median"]
    # Fixed cost: everything outside the training loop (parse, instantiate, setup, workers, teardown).
    out["outside_loop_s"] = light["wall_s"] - light["phases_s"]["loop"]
    out["mean_step_s"] = sum(lt for _, lt, _ in pairs) / len(pairs)
    if profile:
        short = dataclasses.replace(case, warmup=1, steps=min(case.steps, 5))
        log(f"overhead {case.name}: Lightning with SimpleProfiler ({short.warmup}+{short.steps} steps)")
        loop.reset()
        with interleaved(loop.step):
            prof = run_lightning(ws, short, batches, profiler=True)
        prof_pairs = paired(prof["raw"]["steps"], loop.summary()["raw"]["steps"], 1)
        out["profiled"] = {
            "step_s": prof["step_s"],
            "ratio_steady": order_ratios(prof_pairs),
            "profile": prof["profile"],
        }
    del loop
    gc.collect()
    return out
