"""Running a sweep's plan: a runner starts each command (a subprocess, or a fork of a server that
has already imported the heavy modules), and `Sweep` takes each run through its states
(new, restart, resume, test, complete; rewiring.experiment.layout.run_state) under the run's lock.

A runner is `(cmd, log, env) -> exit status`; tests inject fakes that write what a fit or test
process would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rewiring.experiment.layout import (
    BASELINE,
    best_checkpoint,
    is_complete,
    latest_checkpoint,
    lock_file,
    rewire_log_dir,
    run_state,
    split_dir,
    test_metric,
)
from rewiring.experiment.sweep.commands import (
    baseline_source,
    encoder_path,
    encoder_ready,
    fit_command,
    python,
    resume_command,
    rewire_command,
    test_command,
)
from rewiring.experiment.sweep.spec import Run, SweepSpec, plan
from rewiring.files import write_json_atomic
from rewiring.procs import Locked, die_with_parent, exclusive_lock

Runner = Callable[[list[str], Path, dict[str, str]], int]


def subprocess_runner(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """Run one command, its output into `log` (appended: a resumed run keeps its history)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode


# Imported once by the fork server, so each run's process starts with torch, Lightning and the
# project already loaded: a run's start-up drops from ~8 s to ~1.5 s (benchmarks/results.md).
PRELOAD = [
    "torch",
    "lightning.pytorch",
    "transformers",
    "rewiring.experiment.train",
    "rewiring.encoder",
    "rewiring.convergence",
    "rewiring.rewire",
    "rewiring.pairs",
    *(f"tasks.{t}" for t in ("asr", "ks", "ic", "sid", "sd", "sf")),
]


def _child(argv: list[str], log: str, env: dict[str, str], cwd: str) -> None:
    """One run in its own (forked) process: environment, working folder, output and `python -m
    rewiring` as a fresh process's. It dies with the sweep (or the fork server), so a killed sweep
    leaves no fit behind; the fork server, left without clients, then exits by itself."""
    die_with_parent()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:  # a fresh interpreter would have read it at start
            sys.path.insert(0, entry)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own stdout)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if env.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["rewiring", *argv]
    runpy.run_module("rewiring", run_name="__main__", alter_sys=True)  # what `python -m rewiring` runs


class PreloadedRunner:
    """Like `subprocess_runner` (one process per command), but forked from a server that has already
    imported `preload`. Commands that are not `python -m rewiring ...` go to a subprocess.

    The server is multiprocessing's forkserver, one per sweep process, started by the first run and
    given `preload` then (a second runner in the same process shares it as it is)."""

    def __init__(self, preload: Sequence[str] | None = None) -> None:
        self.preload = list(PRELOAD if preload is None else preload)
        self._lock = threading.Lock()
        self._context = None

    def context(self):
        with self._lock:
            if self._context is None:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(self.preload)
                self._context = ctx
            return self._context

    def __call__(self, cmd: list[str], log: Path, env: dict[str, str]) -> int:
        prefix = python()
        if cmd[: len(prefix)] != prefix:
            return subprocess_runner(cmd, log, env)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
        proc = self.context().Process(target=_child, args=(cmd[len(prefix) :], str(log), env, os.getcwd()))
        proc.start()
        proc.join()
        return proc.exitcode if proc.exitcode is not None else 1


def _tail(log: Path, n: int = 15) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


class Sweep:
    """Runs a plan with a runner (a subprocess per command by default; tests inject a fake)."""

    def __init__(self, spec: SweepSpec, runner: Runner = subprocess_runner, out=None) -> None:
        self.spec = spec
        self.runner = runner
        self.out = out or sys.stdout
        self.runs = plan(spec)
        self._lock = threading.Lock()
        self._done = 0
        self.failed: list[str] = []
        self.locked: list[str] = []  # runs another live process was running
        self.ran = 0
        self.skipped = 0
        self._t0 = time.monotonic()

    # -- helpers
    def env(self, capped: bool = True) -> dict[str, str]:
        """The runs' environment: `threads` OMP/MKL threads each when `capped` (`jobs` runs share the
        machine); the rewiring stage runs alone and keeps torch's default (every core)."""
        env = dict(os.environ)
        if capped and self.spec.threads:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[k] = str(self.spec.threads)
        return env

    def print(self, msg: str) -> None:
        with self._lock:
            print(msg, file=self.out, flush=True)

    def _srun(self, single: bool) -> list[str]:
        if not (self.spec.srun and os.environ.get("SLURM_JOB_ID")):
            return []
        return ["srun", "--ntasks=1", "--ntasks-per-node=1"] if single else ["srun"]

    def plan_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "name": s.name,
            "arms": [
                {
                    "name": a,
                    "pairing": None if a == BASELINE else a,
                    "encoder": encoder_path(s, a),
                    "encoder_config": s.encoder,
                }
                for a in s.arms
            ],
            "baseline": BASELINE if BASELINE in s.arms else None,
            "tasks": s.tasks,
            "splits": s.splits,
            "seeds": s.seeds,
            "lrs": s.lrs,
            "task_lrs": {t: s.lrs_for(t) for t in s.tasks},
            "runs": [
                {
                    "task": r.task,
                    "split": r.split,
                    "split_dir": split_dir(r.split),
                    "arm": r.arm,
                    "lr": r.lr,
                    "seed": r.seed,
                    "dir": str(r.dir),
                }
                for r in self.runs
            ],
            "spec": asdict(s),
        }

    def write_plan(self) -> Path:
        return write_json_atomic(self.spec.root / "sweep.json", self.plan_json())

    # -- rewiring stage
    def missing_encoders(self) -> list[str]:
        return [a for a in self.spec.arms if a != BASELINE and not encoder_ready(self.spec, a)]

    def rewire(self, arm: str) -> bool:
        """Run (or resume) the rewiring stage of one arm; True when its encoder exists after. Skipped
        (False) while another live process holds the stage's lock."""
        try:
            with exclusive_lock(lock_file(rewire_log_dir(self.spec.root, arm))):
                return self._rewire(arm)
        except Locked as e:
            self.print(f"rewiring {arm}: skipped: {e}")
            return False

    def _rewire(self, arm: str) -> bool:
        log_dir = rewire_log_dir(self.spec.root, arm)
        ckpt = latest_checkpoint(log_dir) if (log_dir / "config.yaml").exists() else None
        if ckpt is not None:
            cmd = resume_command(log_dir, ckpt)
        else:
            if log_dir.exists():
                shutil.rmtree(log_dir)
            cmd = rewire_command(self.spec, arm)
        self.print(f"rewiring {arm}: {shlex.join(cmd[2:])}")
        t0 = time.monotonic()
        rc = self.runner(self._srun(False) + cmd, log_dir.parent / f"{arm}.log", self.env(capped=False))
        ok = rc == 0 and encoder_ready(self.spec, arm)
        what = f"encoder in {self.spec.encoder_dir(arm)}" if ok else f"FAILED (exit {rc})"
        self.print(f"rewiring {arm}: {what}, {time.monotonic() - t0:.0f}s")
        if not ok:
            self.print(_tail(log_dir.parent / f"{arm}.log"))
        return ok

    # -- one run
    def run_one(self, run: Run) -> str:
        """Fit (fresh, resumed or skipped) then test one run; returns its progress line's tail."""
        state = run_state(run.dir)
        if state == "complete":
            return "done before: " + describe(run.dir)
        t0 = time.monotonic()
        if state in ("new", "restart", "resume"):
            if state == "restart":
                shutil.rmtree(run.dir)
            if state == "resume":
                cmd = resume_command(run.dir, latest_checkpoint(run.dir))
            else:
                cmd = fit_command(self.spec, run)
            rc = self.runner(self._srun(False) + cmd, run.dir / "fit.log", self.env())
            if rc != 0 or not (run.dir / "convergence.json").exists():
                raise RunFailed(f"fit failed (exit {rc}), log {run.dir / 'fit.log'}", run.dir / "fit.log")
        if (run.dir / "test.json").exists():  # the fit tested itself (--test_json, one device)
            how = {"resume": "resumed, "}.get(state, "")
            return f"{describe(run.dir)}, {how}{time.monotonic() - t0:.1f}s"
        ckpt = best_checkpoint(run.dir)
        if ckpt is None:
            raise RunFailed(f"no checkpoint in {run.dir / 'checkpoints'}", run.dir / "fit.log")
        rc = self.runner(self._srun(True) + test_command(run.dir, ckpt), run.dir / "test.log", self.env())
        if rc != 0 or not (run.dir / "test.json").exists():
            raise RunFailed(f"test failed (exit {rc}), log {run.dir / 'test.log'}", run.dir / "test.log")
        how = {"resume": "resumed, ", "test": "tested, "}.get(state, "")
        return f"{describe(run.dir)}, {how}{time.monotonic() - t0:.1f}s"

    def _do(self, run: Run, blocked: set[str]) -> None:
        try:
            if run.arm in blocked:
                raise RunFailed(f"no encoder for arm {run.arm} (its rewiring failed)", None)
            with exclusive_lock(lock_file(run.dir)):  # a restart never races a live fit or test
                tail = self.run_one(run)
            with self._lock:
                if tail.startswith("done before"):
                    self.skipped += 1
                else:
                    self.ran += 1
        except Locked as e:
            with self._lock:
                self.locked.append(run.label)
            tail = f"skipped: {e}; run the sweep again once it has ended"
        except RunFailed as e:
            with self._lock:
                self.failed.append(run.label)
            tail = f"FAILED: {e}"
            if e.log is not None:
                tail += "\n" + _tail(e.log)
        with self._lock:
            self._done += 1
            i = self._done
        mins, secs = divmod(int(time.monotonic() - self._t0), 60)
        self.print(f"[{i}/{len(self.runs)}] {run.label}: {tail}  ({mins}m{secs:02d}s into the sweep)")

    def execute(self, runs: Sequence[Run] | None = None, blocked: set[str] | None = None) -> None:
        """Baseline runs first (the others compare against them), then the rest; `jobs` at a time."""
        runs = list(self.runs if runs is None else runs)
        blocked = blocked or set()
        for phase in ([r for r in runs if r.arm == BASELINE], [r for r in runs if r.arm != BASELINE]):
            if self.spec.jobs == 1:
                for r in phase:
                    self._do(r, blocked)
                continue
            queue = _FillAwareQueue(phase)

            def work(queue: _FillAwareQueue = queue) -> None:
                while (run := queue.take()) is not None:
                    try:
                        self._do(run, blocked)
                    finally:
                        queue.done(run)

            with ThreadPoolExecutor(self.spec.jobs) as pool:
                for f in [pool.submit(work) for _ in range(self.spec.jobs)]:
                    f.result()

    def run(self, report: bool = True) -> int:
        """The whole sweep: plan, rewiring stage, runs, report. Returns the exit status."""
        t0 = self._t0 = time.monotonic()
        check_baseline(self.spec)
        self.write_plan()
        self.print(
            f"sweep {self.spec.name}: {len(self.runs)} runs "
            f"({sum(is_complete(r.dir) for r in self.runs)} complete already), plan in {self.spec.root / 'sweep.json'}"
        )
        # One rewiring stage at a time: each already keeps the machine busy (its TTS pre-fill runs on
        # processes of its own); two at once on 2 cores took longer than one after the other.
        blocked = {a for a in self.missing_encoders() if not self.rewire(a)}
        self.execute(blocked=blocked)
        mins, secs = divmod(int(time.monotonic() - t0), 60)
        self.print(
            f"sweep {self.spec.name}: {len(self.runs)} runs: {self.ran} ran, {self.skipped} done before, "
            f"{len(self.failed)} failed, "
            + (f"{len(self.locked)} skipped as locked by a live process, " if self.locked else "")
            + f"in {mins}m{secs:02d}s"
        )
        status = 1 if self.failed or blocked or self.locked else 0
        if report:
            from rewiring.experiment.report import write_report

            try:
                path = write_report(self.spec.root, self.spec.report_path)
                self.print(f"report: {path}")
            except Exception as e:  # the runs are safe on disk; say why the report failed
                self.print(f"report failed: {type(e).__name__}: {e}")
                status = 1
        return status


class _FillAwareQueue:
    """The runs in plan order, except that a task's first run of an arm goes alone: it fills that
    arm's feature cache for the task (every split and seed reads it), and a sibling started beside
    it would only wait on the cache's lock with a core idle. The other job takes the next run of
    another task meanwhile. Results do not depend on the order."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self._pending = list(runs)
        self._started: set[tuple[str, str]] = set()
        self._finished: set[tuple[str, str]] = set()
        self._cond = threading.Condition()

    def take(self) -> Run | None:
        with self._cond:
            while self._pending:
                for i, run in enumerate(self._pending):
                    key = (run.arm, run.task)
                    if key in self._finished or key not in self._started:
                        self._started.add(key)
                        return self._pending.pop(i)
                self._cond.wait()
            return None

    def done(self, run: Run) -> None:
        with self._cond:
            self._finished.add((run.arm, run.task))
            self._cond.notify_all()


class RunFailed(RuntimeError):
    def __init__(self, msg: str, log: Path | None) -> None:
        super().__init__(msg)
        self.log = log


def describe(run_dir: Path) -> str:
    """`val/acc 0.812 (best 0.830 @ 60), test/acc 0.800` from a run's files."""
    parts = []
    conv = run_dir / "convergence.json"
    if conv.exists():
        c = json.loads(conv.read_text())
        final, top = c.get("final", {}), c.get("best", {})
        if final.get("value") is not None:
            parts.append(f"{c['metric']} {final['value']:.4g} (best {top['value']:.4g} @ {top['step']})")
        test = run_dir / "test.json"
        if test.exists():
            name = test_metric(c["metric"])
            v = json.loads(test.read_text()).get("metrics", {}).get(name)
            if v is not None:
                parts.append(f"{name} {v:.4g}")
        cache = c.get("notes", {}).get("feature_cache", "")
        if cache.startswith("off"):
            parts.append(f"ENCODED LIVE (feature cache {cache})")
    return ", ".join(parts) or "no metrics"


def check_baseline(spec: SweepSpec) -> None:
    """Fail early, before any run, when the baseline encoder's local folder is missing."""
    if not Path(spec.encoder).exists():
        raise SystemExit(f"sweep {spec.name}: encoder config {spec.encoder} not found")
    if not encoder_ready(spec, BASELINE):
        raise SystemExit(
            f"sweep {spec.name}: the baseline encoder {baseline_source(spec)} (from {spec.encoder}) does not exist yet; "
            "build it first (for the tiny encoder: `make pretrain`)"
        )
