"""Exact resume (rewiring/resume.py): a fit SIGKILLed after a middle checkpoint and resumed with
`fit --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt` ends with the curve, the
TensorBoard points and the weights of the uninterrupted fit; last.ckpt is written at every
validation; the samplers resume mid-epoch, with DataLoader workers too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from torch.utils.data import Dataset

from rewiring.audio import BucketBatchSampler
from rewiring.experiment.train import cli_main
from rewiring.pairs import HalfSampler
from rewiring.resume import ResumableWeightedSampler, resumable_loader, rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]
# One thread, as conftest sets for this process: the same arithmetic in every process.
LAUNCH = (
    "import sys, torch; torch.set_num_threads(1); from rewiring.experiment.train import cli_main; "
    "args, sys.argv = sys.argv[1:], sys.argv[:1]; cli_main(args)"
)


class Hold(Callback):
    """Test helper: a fresh fit stops still once `global_step` reaches `at` (its checkpoint of that
    step is written by then) and says so in `marker`, for the test to SIGKILL it there."""

    def __init__(self, at: int, marker: str) -> None:
        self.at, self.marker = at, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.ckpt_path is None and trainer.global_step == self.at:
            Path(self.marker).write_text(str(self.at))
            time.sleep(300)


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _fit_in_process(args: list[str]) -> None:
    cli_main(args)


def _killed_and_resumed(args: list[str], run: Path, at: int, tmp_path: Path) -> None:
    """The fit in a process SIGKILLed after its checkpoint of step `at`, then resumed from last.ckpt
    with the run's own config.yaml in another process."""
    marker = tmp_path / "held"
    hold = json.dumps({"class_path": "test_resume.Hold", "init_args": {"at": at, "marker": str(marker)}})
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, *args, f"--trainer.callbacks+={hold}"],
            env=_env(), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and marker.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == at
    assert not (run / "convergence.json").exists()  # it never got to the end
    resumed = subprocess.run(
        [sys.executable, "-c", LAUNCH, "fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)],
        env=_env(), cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ: {differ[:5]}"


def _but_clock(d):
    """convergence.json without its wall-clock seconds."""
    if isinstance(d, dict):
        return {k: _but_clock(v) for k, v in d.items() if k not in ("seconds", "total_seconds")}
    return d


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run folder as TensorBoard reads it (a purge drops orphaned points)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_same_scalars(a: Path, b: Path) -> None:
    sa, sb = _scalars(a), _scalars(b)
    assert sorted(sa) == sorted(sb)
    for tag, points in sa.items():
        if tag.startswith("walltime_ms/"):  # x is wall-clock milliseconds: the same values, in order
            assert [v for _, v in points] == [v for _, v in sb[tag]], tag
        else:  # no point lost or written twice
            assert points == sb[tag], tag


# ================================================================ a task fit


def _task_args(corpus: Path, out: Path, version: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--config", f"{REPO}/conf/base.yaml",
        "--config", f"{REPO}/conf/encoder/tiny-random.yaml",
        "--config", f"{REPO}/conf/tasks/ks.yaml",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.version={version}",
        f"--data.init_args.root={corpus}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=16",  # 72 utterances: 5 batches an epoch, so the resumed fit crosses one
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_steps=8",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--model.init_args.dropout=0.5",
        "--model.init_args.lr_head=0.05",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cache", "workers", "every", "at"),
    [("live", 0, 2, 4), ("cached", 0, 5, 5), ("live", 2, 2, 4)],
    ids=["live", "cached-at-epoch-end", "live-workers"],
)
def test_task_fit_killed_and_resumed_equals_the_uninterrupted_fit(
    tiny_corpus, tmp_path, cache, workers, every, at
):
    """Killed after the checkpoint of the validation at step `at` (5: the last batch of epoch 0).
    live: fine-tuning (the encoder's dropout draws too); cached: SUPERB on the frozen-feature cache
    (the head's dropout and the bucketed shuffle draw). With workers, persistent ones: a resumed
    fit makes its validation iterator at another step."""
    extra = [
        *(["--model.init_args.feature_cache=null", "--model.init_args.protocol=finetune"] if cache == "live"
          else [f"--model.init_args.feature_cache={tmp_path / 'features'}"]),
        f"--data.init_args.num_workers={workers}",
        f"--trainer.val_check_interval={every}",
        "--trainer.max_steps=10",
    ]  # fmt: skip
    _fit_in_process(_task_args(tiny_corpus, tmp_path, "ref", *extra))
    run = tmp_path / "ks" / "run"
    _killed_and_resumed(_task_args(tiny_corpus, tmp_path, "run", *extra), run, at=at, tmp_path=tmp_path)

    ref = tmp_path / "ks" / "ref"
    a, b = (json.loads((r / "convergence.json").read_text()) for r in (ref, run))
    assert b["curve"]["steps"] == list(range(every, 11, every)) and b["global_step"] == 10
    assert _but_clock(a) == _but_clock(b)  # curve, final, best, area, reach, skip counts, checkpoints
    _assert_same_weights(ref, run)
    _assert_same_scalars(ref, run)  # the epoch counter too
    assert sorted(p.name for p in (tmp_path / "ks").iterdir()) == ["ref", "run"]  # no version_1 beside


@pytest.mark.slow
def test_last_checkpoint_is_rewritten_at_every_validation_and_at_the_end(tiny_corpus, tmp_path):
    """With lr 0 the dev metric never improves after the first validation: the best checkpoint stays
    at step 2 and last.ckpt follows every validation, then the end (step 5, no validation there)."""
    seen = tmp_path / "seen.txt"
    probe = json.dumps({"class_path": f"{__name__}.LastProbe", "init_args": {"record": str(seen)}})
    cli = cli_main(
        _task_args(tiny_corpus, tmp_path, "v", "--model.init_args.lr_head=0.0", "--trainer.max_steps=5",
                   "--model.init_args.feature_cache=null", f"--trainer.callbacks+={probe}")
    )  # fmt: skip
    ckpts = tmp_path / "ks" / "v" / "checkpoints"
    assert [int(s) for s in seen.read_text().split()] == [2, 4]  # last.ckpt as each next batch starts
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 5
    assert sorted(p.name for p in ckpts.iterdir()) == ["best-step=2.ckpt", "last.ckpt"]
    best = cli.trainer.checkpoint_callback  # the best one: testing and convergence.json read it
    assert best.monitor == "val/acc" and Path(best.best_model_path).name == "best-step=2.ckpt"
    conv = json.loads((tmp_path / "ks" / "v" / "convergence.json").read_text())
    assert conv["checkpoint"] == {"best": "checkpoints/best-step=2.ckpt", "last": "checkpoints/last.ckpt"}


class LastProbe(Callback):
    """Test helper: writes last.ckpt's global step whenever a training batch starts after it changed."""

    def __init__(self, record: str) -> None:
        self.record, self.mtime = record, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = Path(trainer.log_dir) / "checkpoints" / "last.ckpt"
        if last.exists() and last.stat().st_mtime_ns != self.mtime:
            self.mtime = last.stat().st_mtime_ns
            with open(self.record, "a") as f:
                f.write(f"{torch.load(last, map_location='cpu', weights_only=False)['global_step']}\n")


# ================================================================ a rewiring fit


def _rewire_args(corpus: Path, out: Path, version: str) -> list[str]:
    return [
        "fit",
        "--config", f"{REPO}/conf/base.yaml",
        "--config", f"{REPO}/conf/encoder/tiny-random.yaml",
        "--config", f"{REPO}/conf/stages/rewire.yaml",
        f"--data.init_args.manifest={corpus / 'unlabelled' / 'train.jsonl'}",
        "--data.init_args.pairing=twin",
        "--data.init_args.prefill_workers=0",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=16",  # 64 utterances: 4 steps an epoch
        f"--data.init_args.cache_dir={out / 'tts'}",
        f"--model.init_args.export_dir={out / 'export' / version}",
        "--model.init_args.isotropy_manifest=null",
        "--model.init_args.transcription_check=false",
        "--model.init_args.checkpoint_every_n_steps=2",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.version={version}",
        "--trainer.max_epochs=2",  # 8 steps
        "--trainer.max_steps=-1",
        "--trainer.log_every_n_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip


@pytest.mark.slow
def test_rewiring_fit_killed_and_resumed_equals_the_uninterrupted_fit(tiny_corpus, tmp_path):
    """Killed after the checkpoint at the end of its first epoch (of two): the second is neither
    skipped nor empty (an epoch-end loader state gives the next epoch from its start)."""
    _fit_in_process(_rewire_args(tiny_corpus, tmp_path, "ref"))
    run = tmp_path / "rewire" / "run"
    _killed_and_resumed(_rewire_args(tiny_corpus, tmp_path, "run"), run, at=4, tmp_path=tmp_path)
    ref = tmp_path / "rewire" / "ref"
    _assert_same_weights(ref, run)
    _assert_same_scalars(ref, run)
    a, b = (json.loads((tmp_path / "export" / v / "rewiring.json").read_text()) for v in ("ref", "run"))
    assert a == b and a["steps"] == 8  # the learning summary of the whole run, not of its second half


# ================================================================ samplers and the loader


class Noisy(Dataset):
    """Each item draws from torch's, numpy's and python's generators, as crops and masks do."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, i):
        import random

        import numpy as np

        return torch.tensor([float(i), float(torch.rand(())), float(np.random.rand()), random.random()])


def _resumes(make, epochs: int = 3, stop: int = 3) -> None:
    """A loader from `make()` run `epochs` epochs straight equals one stopped after `stop` batches of
    its second epoch, its state saved with the random states, and a fresh loader loaded with both in
    the resumed fit's order: the loader's state, its iterator, then the random states (ExactResume)."""
    seed_everything(0, verbose=False)
    loader = make()
    straight = [b for _ in range(epochs) for b in loader]
    seed_everything(0, verbose=False)
    first = make()
    seen = list(first)
    it = iter(first)
    seen += [next(it) for _ in range(stop)]
    state, rng = first.state_dict(), rng_state()
    del it, first
    again = make()
    again.load_state_dict(state)
    it = iter(again)
    set_rng_state(rng)
    seen += list(it) + [b for _ in range(epochs - 2) for b in again]
    assert len(seen) == len(straight)
    for x, y in zip(seen, straight, strict=True):
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y


def _collate(items):
    return torch.stack(items) if torch.is_tensor(items[0]) else items


@pytest.mark.parametrize("workers", [0, 2])
def test_bucketed_loader_resumes_mid_epoch(workers):
    durations = [1.0 + (i % 7) for i in range(23)]
    _resumes(lambda: resumable_loader(Noisy(), batch_sampler=BucketBatchSampler(durations, 4, seed=3, drop_last=False),
                                      collate_fn=_collate, num_workers=workers))  # fmt: skip


def test_shuffled_weighted_and_half_samplers_resume_mid_epoch():
    _resumes(lambda: resumable_loader(Noisy(), batch_size=4, shuffle=True, collate_fn=_collate))
    weights = [1.0 + (i % 3) for i in range(23)]
    _resumes(lambda: resumable_loader(Noisy(), batch_size=4, collate_fn=_collate, sampler=ResumableWeightedSampler(
        weights, 23, generator=torch.Generator().manual_seed(1))))  # fmt: skip

    class Keys(Dataset):
        def __len__(self):
            return 23

        def __getitem__(self, key):
            return key

    _resumes(
        lambda: resumable_loader(Keys(), batch_size=4, sampler=HalfSampler(23, seed=5), collate_fn=_collate)
    )
    bucket = lambda: HalfSampler(23, seed=5, batches=BucketBatchSampler([1.0] * 23, 4, seed=2))  # noqa: E731
    _resumes(lambda: resumable_loader(Keys(), batch_sampler=bucket(), collate_fn=_collate))


def test_weighted_sampler_draws_as_torch_does():
    from torch.utils.data import WeightedRandomSampler

    weights = [1.0, 2.0, 3.0, 0.5]
    ours = ResumableWeightedSampler(weights, 20, generator=torch.Generator().manual_seed(4))
    torch_s = WeightedRandomSampler(weights, 20, generator=torch.Generator().manual_seed(4))
    assert [list(ours) for _ in range(2)] == [list(torch_s) for _ in range(2)]


def test_a_finished_pass_resumes_as_the_next_epoch():
    """A checkpoint at an epoch's last batch: the state gives the next epoch from its start (else
    Lightning's resumed epoch would be an empty one, and max_epochs would end the fit early)."""
    from rewiring.resume import ResumableShuffle

    weights = [1.0 + (i % 3) for i in range(23)]
    makers = {
        "bucket": lambda: BucketBatchSampler([1.0 + (i % 7) for i in range(23)], 4, seed=3, drop_last=False),
        "half": lambda: HalfSampler(23, seed=5),
        "half-bucket": lambda: HalfSampler(23, seed=5, batches=BucketBatchSampler([1.0] * 23, 4, seed=2)),
        "shuffle": lambda: ResumableShuffle(23, seed=1),
        "weighted": lambda: ResumableWeightedSampler(weights, 23, generator=torch.Generator().manual_seed(1)),
    }
    for name, make in makers.items():
        straight = make()
        first, second = list(straight), list(straight)
        assert first != second, name  # a finished pass goes on to the next epoch's order
        killed = make()
        it = iter(killed)
        assert [next(it) for _ in range(len(first))] == first  # the last batch taken, none asked beyond
        resumed = make()
        resumed.load_state_dict(killed.state_dict())
        assert list(resumed) == second, name


def test_an_auto_numbered_run_resumes_in_its_own_folder(tiny_corpus, tmp_path):
    """`runs/ks/version_0/checkpoints/last.ckpt` continues in version_0, not a new version_1."""
    args = [a for a in _task_args(tiny_corpus, tmp_path, "x", "--trainer.max_steps=2") if "logger.init_args.version" not in a]
    first = cli_main(args)
    run = Path(first.trainer.logger.log_dir)
    assert run.name == "version_0"
    resumed = cli_main([*args, "--trainer.max_steps=4", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert Path(resumed.trainer.logger.log_dir) == run and resumed.trainer.global_step == 4
    assert not (run.parent / "version_1").exists()


class KillAt(Callback):
    """Test helper: a fresh fit SIGKILLs itself once `global_step` reaches `at` (its last.ckpt of
    that step is written by then), as `kill -9` would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.ckpt_path is None and trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_sweep_resumed_reports_what_an_uninterrupted_one_does(tiny_corpus, tmp_path, monkeypatch):
    """Two arms of ks; in the second sweep every fit is killed at step 4 and the sweep is run again:
    every run's curve and test metric, and the report, equal the uninterrupted sweep's."""
    import yaml

    from rewiring.encoder import TINY_CONFIG, SpeechEncoder
    from rewiring.experiment import sweep as sw
    from rewiring.experiment.sweep.runners import subprocess_runner

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    baseline = SpeechEncoder(TINY_CONFIG).save_pretrained(tmp_path / "encoders" / "tiny")
    torch.manual_seed(1)
    other = SpeechEncoder(TINY_CONFIG).save_pretrained(tmp_path / "other")
    encoder = tmp_path / "tiny.yaml"
    encoder.write_text(yaml.safe_dump({"model": {"init_args": {"encoder": {
        "class_path": "rewiring.encoder.SpeechEncoder", "init_args": {"source": str(baseline)}}}}}))  # fmt: skip

    def spec(name: str, *extra: str) -> list[str]:
        root = tmp_path / name
        (root / "encoders").mkdir(parents=True, exist_ok=True)
        if not (root / "encoders" / "twin").exists():
            (root / "encoders" / "twin").symlink_to(other)  # the arm's encoder exists: no rewiring stage
        body = {
            "name": "k", "encoder": str(encoder), "arms": ["baseline", "twin"], "tasks": ["ks"],
            "splits": ["50%"], "seeds": [0], "lrs": [0.01], "jobs": 1, "threads": 1,
            "base_config": str(REPO / "conf/base.yaml"), "task_config": str(REPO / "conf/tasks/{task}.yaml"),
            "data_root": str(tiny_corpus), "runs_dir": str(root / "runs"), "report_dir": str(root / "report"),
            "encoders_dir": str(root / "encoders"),
            "args": ["--trainer.max_steps=8", "--trainer.val_check_interval=2", "--trainer.accelerator=cpu",
                     "--data.init_args.num_workers=0", "--data.init_args.batch_size=8", "--trainer.limit_val_batches=2",
                     "--trainer.limit_test_batches=2", "--model.init_args.dropout=0.3",
                     f"--model.init_args.feature_cache={tmp_path / 'features'}", *extra],
        }  # fmt: skip
        (root / "spec.yaml").write_text(yaml.safe_dump(body))
        return ["--config", str(root / "spec.yaml")]

    assert sw.run_sweep(spec("whole"), runner=subprocess_runner) == 0
    kill = json.dumps({"class_path": "test_resume.KillAt", "init_args": {"at": 4}})
    assert sw.run_sweep(spec("killed", f"--trainer.callbacks+={kill}"), runner=subprocess_runner) == 1
    assert sw.run_sweep(spec("killed"), runner=subprocess_runner) == 0

    for arm in ("baseline", "twin"):
        runs = {n: tmp_path / n / "runs" / "k" / "ks" / "50pct" / arm / "lr0.01" / "seed0" for n in ("whole", "killed")}
        log = (runs["killed"] / "fit.log").read_text()
        assert log.count("$ ") == 2 and "--ckpt_path" in log.split("$ ")[2]  # killed, then resumed
        conv = {n: json.loads((d / "convergence.json").read_text()) for n, d in runs.items()}
        assert conv["killed"]["curve"]["steps"] == conv["whole"]["curve"]["steps"] == [2, 4, 6, 8]
        assert conv["killed"]["curve"]["values"] == conv["whole"]["curve"]["values"], arm
        tests = {n: json.loads((d / "test.json").read_text())["metrics"] for n, d in runs.items()}
        assert tests["killed"] == tests["whole"], arm
    reports = {n: (tmp_path / n / "report" / "report.md").read_text().replace(str(tmp_path / n), "ROOT") for n in ("whole", "killed")}
    assert reports["killed"] == reports["whole"]
