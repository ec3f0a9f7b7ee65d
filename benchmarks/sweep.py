"""4. Sweep overhead: what one `python -m rewiring fit` process pays besides its training steps.

Measured in subprocesses exactly as a sweep launches them (OMP_NUM_THREADS=1, one core each):
the interpreter alone, the imports a fit of a task loads, `fit --trainer.max_steps=1`, and a demo
fine-tuning run (60 steps of the tiny encoder on ks, validating every 20 steps as conf/base.yaml
says). A StepTimer in each fit run writes its phase stamps, so start-up splits into its parts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CONF, REPO, Workspace, encoder_config, log, steady, summarize

IMPORTS = (
    "import rewiring.experiment.train, rewiring.encoder, rewiring.convergence, tasks.ks; "
    "from lightning.pytorch.loggers import TensorBoardLogger"
)


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _timed(cmd: list[str], timeout: float = 400) -> tuple[float, float, subprocess.CompletedProcess]:
    start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed:\n{proc.stderr[-3000:]}")
    return start, wall, proc


def fit_args(ws: Workspace, steps: int, name: str, timer_out: Path, protocol: str) -> list[str]:
    return [
        sys.executable, "-m", "rewiring", "fit",
        "--config", str(CONF / "base.yaml"), *encoder_config(ws, "tiny"),
        "--config", str(CONF / "tasks" / "ks.yaml"),
        f"--data.init_args.root={ws.ks_root}",
        f"--model.init_args.protocol={protocol}",
        f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={ws.runs}",
        f"--trainer.logger.init_args.name=sweep-{name}",
        "--trainer.callbacks+=benchmarks.timer.StepTimer",
        f"--trainer.callbacks.init_args.out={timer_out}",
    ]  # fmt: skip


def fit_run(ws: Workspace, steps: int, name: str, protocol: str) -> dict[str, Any]:
    timer_out = ws.tmp / f"timer-{name}.json"
    start, wall, _ = _timed(fit_args(ws, steps, name, timer_out, protocol))
    t = json.loads(timer_out.read_text())
    stamps = t["wall"]
    end = start + wall
    step_times = steady(t["steps"], 2)
    return {
        "steps": steps,
        "wall_s": wall,
        "loop_s": t["loop_seconds"],
        "step_s": summarize(step_times) if t["steps"] else None,
        "phases_s": {
            # process start -> Callback.setup: interpreter, imports, parsing, instantiation, data setup
            "start_to_setup": stamps["setup"] - start,
            "setup_to_first_batch": stamps["first_batch"] - stamps["setup"],
            "loop": t["loop_seconds"],
            # last step -> process exit: final validation/checkpoint, teardown, interpreter exit
            "train_end_to_exit": end - stamps["train_end"],
        },
    }


def _fit_in_child(args: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from rewiring.experiment.train import cli_main

    cli_main(args)


def forked_fit(ws: Workspace, steps: int, name: str, protocol: str) -> float:
    """The same fit in a fork of this process, whose imports are done: what a sweep that starts its
    runs from a pre-imported parent (multiprocessing forkserver with preloaded modules) would pay."""
    import multiprocessing as mp

    args = fit_args(ws, steps, name, ws.tmp / f"timer-{name}.json", protocol)[3:]  # no `python -m rewiring`
    t0 = time.perf_counter()
    proc = mp.get_context("fork").Process(target=_fit_in_child, args=(args,))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"forked fit {name} exited with {proc.exitcode}")
    return time.perf_counter() - t0


def measure(ws: Workspace, quick: bool, protocol: str = "superb") -> dict[str, Any]:
    reps = 1 if quick else 3
    demo_steps = 6 if quick else 60
    out: dict[str, Any] = {"protocol": protocol, "demo_steps": demo_steps}
    log(f"sweep: interpreter and imports ({reps}x)")
    out["interpreter_s"] = summarize([_timed([sys.executable, "-c", "pass"])[1] for _ in range(reps)])
    out["imports_s"] = summarize([_timed([sys.executable, "-c", IMPORTS])[1] for _ in range(reps)])
    log(f"sweep: fit --trainer.max_steps=1 ({reps}x)")
    ones = [fit_run(ws, 1, f"one{i}", protocol) for i in range(reps)]
    out["fit_one_step"] = {
        "wall_s": summarize([r["wall_s"] for r in ones]),
        "start_to_setup_s": summarize([r["phases_s"]["start_to_setup"] for r in ones]),
        "setup_to_first_batch_s": summarize([r["phases_s"]["setup_to_first_batch"] for r in ones]),
        "train_end_to_exit_s": summarize([r["phases_s"]["train_end_to_exit"] for r in ones]),
        "runs": ones,
    }
    log(f"sweep: the same fit forked from this (imported) process ({reps}x)")
    out["forked_one_step_s"] = summarize([forked_fit(ws, 1, f"fork{i}", protocol) for i in range(reps)])
    log(f"sweep: demo run ({demo_steps} steps, {protocol}, validation every 20 steps)")
    demo = fit_run(ws, demo_steps, "demo", protocol)
    out["demo"] = demo
    fixed = out["fit_one_step"]["wall_s"]["median"]
    out["fixed_cost_s"] = fixed
    out["fixed_share_of_demo"] = fixed / demo["wall_s"] if demo["wall_s"] else None
    out["outside_loop_share_of_demo"] = (demo["wall_s"] - demo["loop_s"]) / demo["wall_s"]
    out["forked_saving_s"] = fixed - out["forked_one_step_s"]["median"]
    return out
