"""Children die with their parent, and a run folder is used by one live process at a time.

Real processes: a parent starts its children, is killed with SIGKILL, and within a few seconds none
of its descendants is left (a zombie counts as gone: it holds no memory, and PID 1 in a container
may not reap it). The children are tiny stand-ins: a synthesizer that sleeps, a sweep command that
blocks reading a FIFO.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rewiring.experiment import layout
from rewiring.experiment import sweep as sw
from rewiring.procs import Locked, exclusive_lock

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[1], []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if (st := _stat(p)) is not None and st[0] not in ("Z", "X")}


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the parent ended before {what} (exit {proc.returncode}): {out}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_and_check(parent: subprocess.Popen, children: set[int]) -> None:
    assert children, "the parent started no children"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(children)
    for pid in left:  # leave no orphan behind, whatever the result
        os.kill(pid, signal.SIGKILL)
    assert not left, f"orphans after kill -9 of their parent: {sorted(left)}"


def _start(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    # `python -c`: the spawned and forked children do not re-run a main file
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


SLOW_SYNTH = '''
import os, time
from pathlib import Path
import numpy as np
from rewiring.synthesis.base import Synthesizer

class Slow(Synthesizer):
    """Says nothing for a long time: marks its pid, then sleeps."""
    name = "slow"

    def __init__(self, marks: str) -> None:
        self.marks = marks

    def cache_params(self) -> dict:
        return {}

    def _synthesize(self, text: str):
        Path(self.marks, str(os.getpid())).write_text(text)
        time.sleep(300)
        return np.ones(1600, dtype=np.float32) * 0.1, 16000
'''


@linux_only
def test_synthesis_workers_die_with_a_killed_parent(tmp_path):
    (tmp_path / "slowsynth.py").write_text(SLOW_SYNTH)
    marks = tmp_path / "marks"
    marks.mkdir()
    parent = _start(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from slowsynth import Slow
        from rewiring.synthesis.cache import SynthesisCache
        from rewiring.synthesis.command import fill_cache
        cache = SynthesisCache(Slow(sys.argv[2]), root=sys.argv[3])
        fill_cache(cache, [f"text number {i}" for i in range(4)], batch_size=1, workers=2)
        """,
        str(tmp_path), str(marks), str(tmp_path / "cache"),
    )  # fmt: skip
    try:
        # both workers are saying a text (so they have started and armed their signal)
        _wait_for(lambda: len(list(marks.iterdir())) >= 2, 120, "two synthesis workers", parent)
        workers = {int(p.name) for p in marks.iterdir()}
        children = _descendants(parent.pid)
        assert workers <= children  # the resource tracker is among the children too
    finally:
        if parent.poll() is None:
            _kill_and_check(parent, _descendants(parent.pid))


@linux_only
def test_the_sweeps_fork_server_and_its_running_fit_die_with_a_killed_sweep(tmp_path):
    """The sweep's preloaded runner forks a run from its fork server; the run here is a `rewiring
    sweep --config FIFO`, which blocks reading a FIFO nobody writes."""
    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    parent = _start(
        """
        import os, sys
        from pathlib import Path
        from rewiring.experiment.sweep.runners import PreloadedRunner
        runner = PreloadedRunner(["rewiring.experiment.sweep"])  # a light server: the test is about its lifetime
        runner([sys.executable, "-m", "rewiring", "sweep", "--config", sys.argv[1]], Path(sys.argv[2]), dict(os.environ))
        """,
        str(fifo), str(tmp_path / "fit.log"),
    )  # fmt: skip
    writer = None
    try:

        def reader_open() -> int | None:  # the run has started and is reading: it armed its death first
            try:
                return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return None

        writer = _wait_for(reader_open, 120, "the run to open its FIFO", parent)
        children = _descendants(parent.pid)
        server = [p for p in children if _stat(p)[1] == parent.pid and _descendants(p)]
        assert server, f"no fork server with a running child among {children}"
        _kill_and_check(parent, children)
    finally:
        if writer is not None:
            os.close(writer)
        if parent.poll() is None:
            _kill_and_check(parent, _descendants(parent.pid))


def test_a_lock_is_exclusive_and_names_its_holder(tmp_path):
    path = tmp_path / "run.lock"
    holder = _start(
        """
        import sys, time
        from rewiring.procs import exclusive_lock
        with exclusive_lock(sys.argv[1]):
            print("held", flush=True)
            time.sleep(300)
        """,
        str(path),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Locked, match=rf"locked by a live process, pid {holder.pid}$"):
            with exclusive_lock(path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(path):  # the kernel dropped the dead holder's lock: the stale file blocks nothing
        assert path.read_text().strip() == str(os.getpid())


def _spec(tmp_path: Path) -> list[str]:
    enc = tmp_path / "encoders" / "base"
    enc.mkdir(parents=True)
    (enc / "config.json").write_text("{}")
    conf = tmp_path / "encoder.yaml"
    conf.write_text(json.dumps({"model": {"init_args": {"encoder": {"init_args": {"source": str(enc)}}}}}))
    spec = {
        "name": "t", "encoder": str(conf), "arms": ["baseline"], "tasks": ["ks"], "splits": ["10%"],
        "base_config": str(REPO / "conf/base.yaml"), "task_config": str(REPO / "conf/tasks/{task}.yaml"),
        "seeds": [0, 1], "lrs": [0.001], "runs_dir": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "report"),
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    return ["--config", str(tmp_path / "spec.yaml"), "--report", "false"]


class FakeRunner:
    """Plays a fit (config, checkpoint, convergence.json) and a test (test.json) of a run."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], log: Path, env: dict) -> int:
        self.calls.append(cmd)
        arg = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in cmd if a.startswith("--") and "=" in a}
        if "test" in cmd:
            Path(arg["--test_json"]).write_text(json.dumps({"metrics": {}}))
            return 0
        run = Path(arg["--trainer.logger.init_args.save_dir"]) / arg["--trainer.logger.init_args.name"]
        run = run / arg["--trainer.logger.init_args.version"]
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_text("state")
        (run / "config.yaml").write_text("{}")
        conv = {"metric": "val/acc", "final": {"value": 0.5, "step": 2}, "best": {"value": 0.5, "step": 2}}
        (run / "convergence.json").write_text(json.dumps(conv))
        return 0


def test_a_second_sweep_skips_the_run_a_live_sweep_is_running(tmp_path, capsys):
    args = _spec(tmp_path)
    started = tmp_path / "started"
    # sweep A: its first run's fit blocks (a live fit), holding that run's lock
    sweep_a = _start(
        """
        import sys, time
        from pathlib import Path
        import rewiring.experiment.sweep as sw

        def blocking(cmd, log, env):
            Path(sys.argv[1]).write_text("fit")
            time.sleep(300)
            return 1

        sw.run_sweep([*sys.argv[2:], "--index", "0"], runner=blocking)
        """,
        str(started), *args,
    )  # fmt: skip
    try:
        _wait_for(started.exists, 60, "sweep A's first fit", sweep_a)
        runs = sw.plan(sw.spec_from_config(sw.build_parser().parse_args(args)))
        runner = FakeRunner()
        assert sw.run_sweep(args, runner=runner) == 1  # not all done: one run belongs to A
        out = capsys.readouterr().out
        lock = layout.lock_file(runs[0].dir)
        assert f"seed0: skipped: {lock} is locked by a live process, pid {sweep_a.pid}" in out
        assert "1 ran, 0 done before, 0 failed, 1 skipped as locked by a live process" in out
        assert all(str(runs[0].dir) not in " ".join(c) for c in runner.calls)  # never started
        assert layout.run_state(runs[1].dir) == "complete"
    finally:
        sweep_a.send_signal(signal.SIGKILL)
        sweep_a.wait()
    # A was killed: its lock went with it, and the run is the next sweep's
    assert sw.run_sweep(args, runner=FakeRunner()) == 0
    assert layout.run_state(runs[0].dir) == "complete"
