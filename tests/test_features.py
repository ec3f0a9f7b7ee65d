"""The frozen-feature cache: entries and their checks, keys, filling (killed, concurrent, remade), the size
limits, and a cached SUPERB run against a live one on every task."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from lightning.pytorch import Callback

from rewiring import feature_fill
from rewiring import features as F
from rewiring.audio import AudioError, Skipped, load_audio
from rewiring.encoder import TINY_CONFIG, SpeechEncoder
from rewiring.manifest import Record, audio_path, read_manifest, write_manifest
from tasks.data import TaskBatch
from tasks.features import FeatureBatch, FeatureDataset

REPO = Path(__file__).resolve().parents[1]
# Lighter recurrent heads, so a few steps of every task take seconds.
HEADS = {t: ["--model.init_args.lstm_hidden=32"] for t in ("asr", "sf", "sd")}


# ============================================================================ fixtures and helpers


def _encoder(seed: int = 0, **config) -> SpeechEncoder:
    torch.manual_seed(seed)
    enc = SpeechEncoder({**TINY_CONFIG, **config})
    enc.configure(layers="weighted", freeze=True)
    return enc


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """The tiny encoder saved as a folder, so several processes load the same weights."""
    folder = tmp_path_factory.mktemp("encoder")
    _encoder(0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def layer_norm_config(tmp_path_factory) -> Path:
    """conf/encoder/tiny-random.yaml as a stable-layer-norm model: it masks its padding, so a padded
    batch gives each utterance its own features and live runs equal cached ones up to fp16."""
    conf = yaml.safe_load((REPO / "conf/encoder/tiny-random.yaml").read_text())
    source = conf["model"]["init_args"]["encoder"]["init_args"]["source"]
    source.update(feat_extract_norm="layer", do_stable_layer_norm=True)
    path = tmp_path_factory.mktemp("conf") / "tiny-random-layer-norm.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def _utterances(root: Path, task: str = "ks", splits=("train", "dev", "test")) -> list[F.Utterance]:
    out = []
    for split in splits:
        m = root / task / f"{split}.jsonl"
        out += [F.utterance(audio_path(m, r), r.duration) for r in read_manifest(m)]
    return out


def _store(root: Path, enc: SpeechEncoder, dtype: str = "float16") -> F.FeatureStore:
    return F.FeatureStore(root, enc.feature_key(), enc.num_hidden_states, enc.hidden_size, dtype)


def _entries(store: F.FeatureStore) -> list[Path]:
    return sorted(store.dir.glob("??/*.safetensors"))


class Recorder(Callback):
    """Each training step's batch type and loss, and each validation's metrics."""

    def __init__(self) -> None:
        self.types: list[str] = []
        self.losses: list[float] = []
        self.batches: list = []
        self.vals: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.types.append(type(batch).__name__)
        self.batches.append(batch)
        self.losses.append(float(outputs["loss"]) if outputs is not None else float("nan"))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.vals.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


def _fit(task_cli, task: str, root: Path, *args: str):
    cli = task_cli(task, root, *args, run=False)
    rec = Recorder()
    cli.trainer.callbacks.append(rec)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, rec


def _steps(n: int = 6, val_every: int = 3) -> list[str]:
    return ["--trainer.fast_dev_run=false", f"--trainer.max_steps={n}", f"--trainer.val_check_interval={val_every}",
            "--trainer.limit_val_batches=2"]  # fmt: skip


# ============================================================================ entries


def test_entry_roundtrip_and_each_check(tmp_path):
    store = F.FeatureStore(tmp_path, "a" * 64, num_hidden_states=5, hidden_size=8)
    hidden = torch.randn(5, 7, 8)
    store.write("k1", hidden, samples=2300)
    entry = store.read("k1")
    assert torch.equal(entry.hidden, hidden.half()) and entry.samples == 2300
    assert store.check("k1") is None and store.check("k1", full=True) is None
    assert store.check("nothing") == "missing"
    assert store.path("k1").stat().st_size <= store.entry_bytes(7)  # the estimate bounds the real size
    store.write("empty", torch.zeros(5, 0, 8), samples=100)  # shorter than one frame: an entry of 0 frames
    assert store.read("empty").hidden.shape == (5, 0, 8)
    with pytest.raises(ValueError, match="an entry is"):
        store.write("k2", torch.randn(4, 7, 8), samples=1)

    # a flipped data byte passes the header check, not the CRC
    data = bytearray(store.path("k1").read_bytes())
    data[-3] ^= 0xFF
    store.path("k1").write_bytes(bytes(data))
    assert store.check("k1") is None
    assert "CRC" in store.check("k1", full=True)
    with pytest.raises(F.FeatureCacheError, match=r"k1\.safetensors: CRC"):
        store.read("k1")
    # a truncated file fails the header check
    store.write("k1", hidden, samples=2300)
    store.path("k1").write_bytes(store.path("k1").read_bytes()[:-10])
    assert "truncated" in store.check("k1")
    # an entry under another key, or from another encoder, is refused
    store.write("k3", hidden, samples=2300)
    shutil.copy(store.path("k3"), store.path("k1"))
    assert "does not match" in store.check("k1")
    other = F.FeatureStore(tmp_path, "b" * 64, num_hidden_states=5, hidden_size=8)
    other.path("k3").parent.mkdir(parents=True)
    shutil.copy(store.path("k3"), other.path("k3"))
    assert "feature_key" in other.check("k3")


def test_audio_key_follows_the_bytes_not_the_name(tmp_path, tiny_corpus):
    src = audio_path(tiny_corpus / "ks" / "dev.jsonl", read_manifest(tiny_corpus / "ks" / "dev.jsonl")[0])
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    shutil.copy(src, a)
    shutil.copy(src, b)
    assert F.audio_key(a) == F.audio_key(b)
    wav, sr = sf.read(b)
    sf.write(b, wav * 0.5, sr)
    assert F.audio_key(a) != F.audio_key(b)
    # a record that is a segment of its file has its own entry
    keys = {F.audio_key(a), F.audio_key(a, 0.0, 0.5), F.audio_key(a, 0.25, 0.5), F.audio_key(a, 0.25, 0.6)}
    assert len(keys) == 4 and F.audio_key(a, 0.25, 0.5) == F.utterance(a, 0.5, 0.25, {}).key


def test_segments_of_one_recording_are_cached_as_segments(tmp_path, tiny_corpus):
    enc = _encoder(0)
    m = tiny_corpus / "asr" / "dev.jsonl"
    path = audio_path(m, read_manifest(m)[0])
    hashes: dict[str, str] = {}
    utts = [F.utterance(path, 0.8, offset, hashes) for offset in (0.0, 0.4)]
    assert len(hashes) == 1  # the file's bytes are hashed once for both segments
    store = _store(tmp_path, enc, "float32")
    feature_fill.fill(store, enc, utts, progress=False)
    with torch.inference_mode():
        for u in utts:
            wav = load_audio(path, record=u)[None]
            assert wav.shape[1] == u.samples
            hidden, _ = enc.hidden(wav)
            torch.testing.assert_close(store.read(u.key).hidden, torch.stack(hidden)[:, 0], atol=1e-4, rtol=1e-4)


# ============================================================================ filling


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_fill_stores_each_utterance_as_encoded_alone(tmp_path, tiny_corpus, norm):
    """Entries equal the encoder's hidden states of the utterance alone, whatever the fill batches:
    a GroupNorm encoder (padding changes its features) gets one length per batch."""
    config = {} if norm == "group" else {"feat_extract_norm": "layer", "do_stable_layer_norm": True}
    enc = _encoder(0, **config)
    utts = _utterances(tiny_corpus, "asr", ("dev",))
    store = _store(tmp_path, enc, "float32")
    report = feature_fill.fill(store, enc, utts, batch_seconds=60, progress=False)
    assert report.made == len(utts) == len(_entries(store)) and not report.bad
    assert report.audio_seconds == pytest.approx(sum(u.samples for u in utts) / 16000, abs=0.01)
    batches = feature_fill.plan_batches(utts, 60 * 16000, same_length=norm == "group")
    assert max(len(b) for b in batches) == (1 if norm == "group" else len(utts))  # dev lengths all differ
    with torch.inference_mode():
        for u in utts[:4]:
            wav = load_audio(u.path)[None]
            hidden, mask = enc.hidden(wav, torch.ones_like(wav).long())
            entry = store.read(u.key)
            assert entry.samples == wav.shape[1]
            assert entry.hidden.shape == (enc.num_hidden_states, int(mask.sum()), enc.hidden_size)
            torch.testing.assert_close(entry.hidden, torch.stack(hidden)[:, 0], atol=1e-4, rtol=1e-4)
    again = feature_fill.fill(store, enc, utts, progress=False)
    assert (again.present, again.made) == (len(utts), 0)


def test_a_changed_encoder_never_reads_another_encoders_features(tmp_path, tiny_corpus):
    utts = _utterances(tiny_corpus, "ks", ("dev",))
    first, other, unnormalised = _encoder(0), _encoder(1), _encoder(0)
    unnormalised.normalize = False
    keys = {first.feature_key(), other.feature_key(), unnormalised.feature_key()}
    assert len(keys) == 3  # weights and input normalisation are both in the key
    a, b = _store(tmp_path, first), _store(tmp_path, other)
    assert a.dir != b.dir
    feature_fill.fill(a, first, utts, progress=False)
    report = feature_fill.fill(b, other, utts, progress=False)
    assert (report.present, report.made) == (0, len(utts))  # nothing of the first encoder's was used
    u = utts[0]
    assert not torch.equal(a.read(u.key).hidden, b.read(u.key).hidden)
    # an entry of the first encoder put where the other one looks is refused and made again
    shutil.copy(a.path(u.key), b.path(u.key))
    assert "feature_key" in b.check(u.key)
    report = feature_fill.fill(b, other, utts, progress=False)
    assert (report.remade, report.made) == (1, 1)
    assert not torch.equal(b.read(u.key).hidden, a.read(u.key).hidden)


def test_entries_that_fail_their_check_are_remade(tmp_path, tiny_corpus):
    enc = _encoder(0)
    utts = _utterances(tiny_corpus, "ks", ("dev",))
    store = _store(tmp_path, enc)
    feature_fill.fill(store, enc, utts, progress=False)
    good = store.read(utts[0].key).hidden.clone()
    data = bytearray(store.path(utts[0].key).read_bytes())
    data[-5] ^= 0xFF  # silent corruption: only the CRC sees it
    store.path(utts[0].key).write_bytes(bytes(data))
    store.path(utts[1].key).write_bytes(store.path(utts[1].key).read_bytes()[:100])  # truncated
    header_only = feature_fill.fill(store, enc, utts, progress=False)
    assert (header_only.remade, header_only.made) == (1, 1)  # the truncated one
    full = feature_fill.fill(store, enc, utts, full_check=True, progress=False)
    assert (full.remade, full.made, full.present) == (1, 1, len(utts) - 1)  # and now the flipped one
    # made again alone, not in its first batch: equal up to fp16 rounding of float noise
    torch.testing.assert_close(store.read(utts[0].key).hidden, good, atol=2e-3, rtol=2e-3)


# One process filling ks dev+test with the encoder folder; with KILL_AT=k it dies (SIGKILL) in the
# middle of writing its k-th entry. Prints the fill's counts and a checksum of every entry.
CHILD = r"""
import json, os, signal, sys, torch
torch.set_num_threads(1)
from rewiring import features as F
from rewiring.encoder import SpeechEncoder
from rewiring.feature_fill import fill
from rewiring.manifest import audio_path, read_manifest
encoder_dir, cache, kill_at, manifests = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
enc = SpeechEncoder(encoder_dir)
enc.configure(layers="weighted", freeze=True)
utts = [F.utterance(audio_path(m, r), r.duration) for m in manifests for r in read_manifest(m)]
store = F.FeatureStore(cache, enc.feature_key(), enc.num_hidden_states, enc.hidden_size)
if kill_at:
    write, calls = F.FeatureStore.write, [0]
    def dying(self, key, hidden, samples):
        calls[0] += 1
        if calls[0] == kill_at:
            with F.atomic_file(self.path(key), "wb") as f:
                f.write(b"half an entry")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return write(self, key, hidden, samples)
    F.FeatureStore.write = dying
report = fill(store, enc, utts, progress=False, announce=lambda m: print("WAITED", m, flush=True))
total = sum(float(store.read(u.key).hidden.double().sum()) for u in utts)
print(json.dumps({"made": report.made, "present": report.present, "checksum": total}), flush=True)
"""


def _child(encoder_dir: Path, cache: Path, manifests: list[Path], kill_at: int = 0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-c", CHILD, str(encoder_dir), str(cache), str(kill_at), *map(str, manifests)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_killed_fill_leaves_no_half_entry_and_resumes(tmp_path, tiny_corpus, encoder_dir):
    manifests = [tiny_corpus / "ks" / "dev.jsonl", tiny_corpus / "ks" / "test.jsonl"]
    proc = _child(encoder_dir, tmp_path / "cache", manifests, kill_at=6)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    enc = SpeechEncoder(str(encoder_dir))
    enc.configure(layers="weighted", freeze=True)
    store = _store(tmp_path / "cache", enc)
    utts = [F.utterance(audio_path(m, r), r.duration) for m in manifests for r in read_manifest(m)]
    left = _entries(store)
    assert 0 < len(left) < len(utts)
    assert all(store.check(p.stem, full=True) is None for p in left)  # every entry on disk is whole
    assert list(store.dir.glob("??/.*.tmp"))  # the half-written one stayed a temporary file
    report = feature_fill.fill(store, enc, utts, progress=False)
    assert (report.present, report.made) == (len(left), len(utts) - len(left))
    assert all(store.check(u.key, full=True) is None for u in utts)
    assert store.remove_stale_temporaries(max_age_s=0) >= 1 and not list(store.dir.glob("??/.*.tmp"))
    clean = _store(tmp_path / "clean", enc)
    feature_fill.fill(clean, enc, utts, progress=False)
    for u in utts:  # the resumed cache holds what an uninterrupted fill makes
        assert torch.equal(store.read(u.key).hidden, clean.read(u.key).hidden)


@pytest.mark.slow
def test_two_processes_fill_and_read_the_same_entries_at_once(tmp_path, tiny_corpus, encoder_dir):
    manifests = [tiny_corpus / "ks" / "dev.jsonl", tiny_corpus / "ks" / "test.jsonl"]
    procs = [_child(encoder_dir, tmp_path / "cache", manifests) for _ in range(2)]
    a, b = (_result(p) for p in procs)
    n = len({F.audio_key(audio_path(m, r)) for m in manifests for r in read_manifest(m)})
    assert a["made"] + b["made"] == n  # the lock: each entry made once
    assert a["checksum"] == b["checksum"]  # and both read the same features
    assert sorted([a["present"], b["present"]]) == [0, n]


# ============================================================================ size limits


def test_size_estimate_and_limits(tmp_path, tiny_corpus, monkeypatch):
    enc = _encoder(0)
    utts = _utterances(tiny_corpus, "ks", ("dev",))
    store = _store(tmp_path, enc)
    space = F.room(store, utts, enc.frame_lengths, max_gb=1.0)
    frames = enc.frame_lengths(torch.tensor([u.samples for u in utts])).tolist()
    assert space.ok and space.total_bytes == space.missing_bytes == sum(store.entry_bytes(f) for f in frames)
    assert store.entry_bytes(frames[0]) >= 5 * 128 * frames[0] * 2  # layers x dim x frames x bytes
    assert "5 hidden states x 128 dims x 2 bytes" in space.reason
    capped = F.room(store, utts, enc.frame_lengths, max_gb=1e-6)
    assert not capped.ok and "above max_gb=1e-06" in capped.reason
    feature_fill.fill(store, enc, utts, progress=False)
    assert F.room(store, utts, enc.frame_lengths, max_gb=1.0).missing_bytes == 0
    usage = shutil.disk_usage(tmp_path)
    fake = usage._replace(free=int(1.5e9))  # 1.5 GB free: less than the reserve once the entries are written
    monkeypatch.setattr(F.shutil, "disk_usage", lambda p: fake)
    assert F.room(store, utts, enc.frame_lengths, max_gb=1.0).ok  # nothing left to write
    full = fake._replace(free=int(1e9))
    monkeypatch.setattr(F.shutil, "disk_usage", lambda p: full)
    fresh = F.room(_store(tmp_path / "other", enc), utts, enc.frame_lengths, max_gb=1.0)
    assert not fresh.ok and "GB free" in fresh.reason


# ============================================================================ in a task run


def test_superb_runs_read_the_cache_and_finetune_never_does(task_cli, tiny_corpus, tmp_path, capsys):
    cache = tmp_path / "features"
    cli, rec = _fit(task_cli, "ks", tiny_corpus, f"--model.init_args.feature_cache={cache}")
    assert rec.types == ["FeatureBatch"] and cli.model.run_notes() == {"feature_cache": "on"}
    assert "[ks] feature cache" in capsys.readouterr().out
    n = len({F.audio_key(audio_path(tiny_corpus / "ks" / f"{s}.jsonl", r))
             for s in ("train", "dev", "test") for r in read_manifest(tiny_corpus / "ks" / f"{s}.jsonl")})  # fmt: skip
    assert len(list(cache.glob("*/float16/??/*.safetensors"))) == n  # the full split, dev and test too
    # a low-resource split of the same task finds everything made
    cli, rec = _fit(task_cli, "ks", tiny_corpus, f"--model.init_args.feature_cache={cache}", "--data.init_args.fraction=0.5")
    assert f"{n} entries: {n} present, 0 made" in capsys.readouterr().out
    # live is one option away, and finetune never reads the cache
    for args in (["--model.init_args.feature_cache=null"], ["--model.init_args.protocol=finetune"]):
        cli, rec = _fit(task_cli, "ks", tiny_corpus, f"--model.init_args.feature_cache={tmp_path / 'unused'}", *args)
        assert rec.types == ["TaskBatch"] and cli.datamodule.features is None and cli.model.run_notes() == {}
    assert not (tmp_path / "unused").exists()


def test_the_cache_opens_after_a_checkpoint_restores_the_encoder(task_cli, tiny_corpus, tmp_path, capsys):
    """A random (config-dict) encoder is rebuilt from another seed, then its checkpoint restores the
    trained run's weights: the features must come from those, so the cache opens only when the loaders
    are built, after the restore."""
    cache = tmp_path / "features"
    _fit(task_cli, "ks", tiny_corpus, *_steps(2, 2), f"--model.init_args.feature_cache={cache}")
    n = len(list(cache.glob("*/float16/??/*.safetensors")))
    assert n > 0 and len(list(cache.iterdir())) == 1
    (ckpt,) = tmp_path.glob("runs/**/checkpoints/last.ckpt")
    capsys.readouterr()
    cli = task_cli("ks", tiny_corpus, "--seed_everything=5", f"--model.init_args.feature_cache={cache}", run=False)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt))
    assert f"{n} entries: {n} present, 0 made" in capsys.readouterr().out
    assert len(list(cache.iterdir())) == 1  # no entries of the seed-5 weights


def test_above_max_gb_the_run_encodes_live(task_cli, tiny_corpus, tmp_path, capsys):
    cache = tmp_path / "features"
    cli, rec = _fit(task_cli, "ks", tiny_corpus, f"--model.init_args.feature_cache={cache}",
                    "--model.init_args.feature_cache_max_gb=0.000001")  # fmt: skip
    out = capsys.readouterr().out
    assert "feature cache off, encoding live" in out and "above max_gb=1e-06" in out
    assert rec.types == ["TaskBatch"] and not list(cache.glob("**/*.safetensors"))
    # convergence.json notes it, and a sweep's progress line says so
    assert cli.model.run_notes()["feature_cache"].startswith("off: estimated") and "above max_gb" in cli.model.run_notes()["feature_cache"]


def test_a_fill_that_fails_leaves_the_run_live(task_cli, tiny_corpus, tmp_path, capsys, monkeypatch):
    def full_disk(self, key, hidden, samples):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(F.FeatureStore, "write", full_disk)
    cli, rec = _fit(task_cli, "ks", tiny_corpus, f"--model.init_args.feature_cache={tmp_path / 'features'}")
    assert "the fill failed (OSError: [Errno 28] No space left on device)" in capsys.readouterr().out
    assert rec.types == ["TaskBatch"] and cli.datamodule.features.reason.startswith("the fill failed")


def test_bad_audio_and_bad_entries_are_skipped_as_live_does(task_cli, tiny_corpus, tmp_path, caplog):
    """A silent file is bad audio on both paths; an entry that fails its check when read is skipped and
    removed (the next fill makes it again); on_bad_audio=error raises instead."""
    root = tmp_path / "corpus"
    for split in ("train", "dev", "test"):
        src = tiny_corpus / "ks" / f"{split}.jsonl"
        recs = [Record(**{**r.to_dict(), "audio": str(audio_path(src, r))}) for r in read_manifest(src)]
        if split == "train":
            sf.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
            recs.append(Record(id="silent", audio=str(tmp_path / "silent.wav"), duration=1.0, label=recs[0].label))
        write_manifest(root / "ks" / f"{split}.jsonl", recs)
    cli, _ = _fit(task_cli, "ks", root, f"--model.init_args.feature_cache={tmp_path / 'features'}")
    ds = cli.datamodule.train_dataloader().dataset
    assert isinstance(ds, FeatureDataset)
    i = [r.id for r in ds.live.records].index("silent")
    with caplog.at_level("WARNING"):
        skipped = ds[i]
    assert isinstance(skipped, Skipped) and skipped.code == "silent" and "silent audio" in caplog.text
    path = ds.store.path(ds.keys[0])
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    skipped = ds[0]
    assert isinstance(skipped, Skipped) and skipped.code == "bad_audio" and "CRC" in skipped.reason
    assert not path.exists()  # removed: the next fill makes it again
    ds.live.on_bad_audio = "error"
    with pytest.raises(AudioError, match="silent audio"):
        ds[i]


def test_entries_are_read_and_checked_once_then_kept_in_memory(task_cli, tiny_corpus, tmp_path, monkeypatch):
    """An epoch re-reads the same files: the second read of an entry comes from memory, equal to the
    file's; past `memo_bytes` entries are read from disk each time."""
    cli, _ = _fit(task_cli, "ks", tiny_corpus, f"--model.init_args.feature_cache={tmp_path / 'features'}")
    ds = cli.datamodule.train_dataloader().dataset
    reads = []
    read = ds.store.read
    monkeypatch.setattr(ds.store, "read", lambda key: reads.append(key) or read(key))
    first = [ds[i].hidden.clone() for i in range(len(ds))]
    assert len(reads) == len(ds)
    again = [ds[i].hidden for i in range(len(ds))]
    assert len(reads) == len(ds) and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    small = cli.datamodule.train_dataloader().dataset
    monkeypatch.setattr(small.store, "read", lambda key: reads.append(key) or read(key))
    one = small.store.read(small.keys[0]).hidden
    small.memo_bytes = one.numel() * one.element_size()  # room for entry 0 only
    reads.clear()
    for _ in range(2):
        for i in range(len(small)):
            small[i]
    assert reads.count(small.keys[0]) == 1 and reads.count(small.keys[1]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("task", ["ks", "ic", "sid", "asr", "sf", "sd"])
def test_a_cached_run_gives_the_live_training_curve(task, task_cli, tiny_corpus, tmp_path, layer_norm_config):
    """Same seed, same batches: train losses and dev metrics agree within fp16 rounding (padding-masking
    encoder, batches of 3), and the features a head sees agree frame by frame."""
    common = ["--config", str(layer_norm_config), *_steps(), "--data.init_args.batch_size=3",
              "--model.init_args.lr_head=0.01", *HEADS.get(task, [])]  # fmt: skip
    live_cli, live = _fit(task_cli, task, tiny_corpus, *common, "--model.init_args.feature_cache=null")
    cli, cached = _fit(task_cli, task, tiny_corpus, *common, f"--model.init_args.feature_cache={tmp_path / 'f'}")
    assert set(live.types) == {"TaskBatch"} and set(cached.types) == {"FeatureBatch"}
    assert [b.ids for b in cached.batches] == [b.ids for b in live.batches]
    assert cached.losses == pytest.approx(live.losses, rel=1e-3)
    assert len(cached.vals) == len(live.vals) == 2
    for c, v in zip(cached.vals, live.vals, strict=True):
        assert c.keys() == v.keys() and c == pytest.approx(v, abs=2e-3)
    lb = next(iter(live_cli.datamodule.val_dataloader()))
    cb = next(iter(cli.datamodule.val_dataloader()))
    assert isinstance(lb, TaskBatch) and isinstance(cb, FeatureBatch) and lb.ids == cb.ids
    with torch.no_grad():
        a, b = cli.model.encode(lb), cli.model.encode(cb)
    assert torch.equal(a.frame_mask, b.frame_mask)
    real_a, real_b = a.features[a.frame_mask], b.features[b.frame_mask]  # padding frames are the heads' to mask
    scale = float(real_a.abs().max())
    torch.testing.assert_close(real_b, real_a, atol=2e-3 * scale, rtol=0)
    torch.testing.assert_close(b.pooled, a.pooled, atol=2e-3 * scale, rtol=0)


@pytest.mark.slow
def test_groupnorm_encoder_matches_live_without_padding(task_cli, tiny_corpus, tmp_path):
    """conf/encoder/tiny-random.yaml itself (GroupNorm, no attention mask) on asr's varied lengths: batches
    of one, so the live run has no padding to depend on, and the curves agree within fp16."""
    common = [*_steps(4, 2), "--data.init_args.batch_size=1", "--model.init_args.lr_head=0.01", *HEADS["asr"]]
    _, live = _fit(task_cli, "asr", tiny_corpus, *common, "--model.init_args.feature_cache=null")
    _, cached = _fit(task_cli, "asr", tiny_corpus, *common, f"--model.init_args.feature_cache={tmp_path / 'f'}")
    assert cached.losses == pytest.approx(live.losses, rel=1e-3)
    assert cached.vals == [pytest.approx(v, abs=2e-3) for v in live.vals]


def test_training_crops_are_frame_aligned_windows_of_the_cached_utterance(task_cli, tiny_corpus, tmp_path):
    cache = tmp_path / "features"
    cli, rec = _fit(task_cli, "sid", tiny_corpus, *_steps(4, 4), "--data.init_args.train_max_seconds=1.0",
                    "--data.init_args.batch_size=4", f"--model.init_args.feature_cache={cache}")  # fmt: skip
    enc, dm = cli.model.encoder, cli.datamodule
    crop_frames = int(enc.frame_lengths(16000))
    ds = dm.train_dataloader().dataset
    assert ds.crop_frames == crop_frames
    by_id = {r.id: (r, k) for r, k in zip(ds.live.records, ds.keys, strict=True)}
    starts = []
    for batch in rec.batches:
        for j, uid in enumerate(batch.ids):
            record, key = by_id[uid]
            full = ds.store.read(key).hidden
            n = int(batch.frame_mask[j].sum())
            window = batch.hidden[:, j, :n]
            if record.duration > 1.0:
                assert n == crop_frames and int(batch.lengths[j]) == crop_frames * enc.samples_per_frame
                hits = [s for s in range(full.shape[1] - n + 1) if torch.equal(full[:, s : s + n], window)]
                assert hits, f"{uid}: the crop is not a window of its cached utterance"
                starts.append(hits[0])
            else:
                assert torch.equal(window, full)
    assert len(set(starts)) > 1  # random offsets, not always the start


def test_sd_crops_read_the_cache(task_cli, tiny_corpus, tmp_path):
    """sd's training windows are frame-aligned crops of cached recordings; its dataset moves the turns."""
    cli, rec = _fit(task_cli, "sd", tiny_corpus, "--data.init_args.crop_seconds=2.0", *HEADS["sd"],
                    f"--model.init_args.feature_cache={tmp_path / 'features'}")  # fmt: skip
    assert rec.types == ["FeatureBatch"]


def test_crops_on_a_dataset_that_cannot_move_its_targets_stay_live(task_cli, tiny_corpus, tmp_path, capsys, monkeypatch):
    """A dataset that reads its own windows without a crop_target would keep the whole recording's
    targets on a cached crop, so such a run encodes live, and says why."""
    from tasks import sd

    monkeypatch.delattr(sd._CroppedSegments, "crop_target")
    cli, rec = _fit(task_cli, "sd", tiny_corpus, "--data.init_args.crop_seconds=2.0", *HEADS["sd"],
                    f"--model.init_args.feature_cache={tmp_path / 'features'}")  # fmt: skip
    assert rec.types == ["TaskBatch"]
    assert "has no crop_target" in capsys.readouterr().out


# ============================================================================ the command


def test_features_command_fills_what_a_task_run_reads(task_cli, tiny_corpus, tmp_path, encoder_dir, capsys):
    from rewiring.experiment.cli import main

    cache = tmp_path / "features"
    manifests = ",".join(str(tiny_corpus / "ks" / f"{s}.jsonl") for s in ("train", "dev", "test"))
    config = tmp_path / "encoder.yaml"  # an encoder config, as conf/encoder/*.yaml
    config.write_text(yaml.safe_dump({"model": {"init_args": {"encoder": {
        "class_path": "rewiring.encoder.SpeechEncoder", "init_args": {"source": str(encoder_dir)}}}}}))  # fmt: skip
    main(["features", "--encoder", str(config), "--manifest", f"[{manifests}]", "--cache_dir", str(cache),
          "--device", "cpu", "--workers", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert "0 present" in out and "made" in out
    n = len(list(cache.glob("*/float16/??/*.safetensors")))
    _fit(task_cli, "ks", tiny_corpus, f"--model.init_args.encoder.init_args.source={encoder_dir}",
         f"--model.init_args.feature_cache={cache}")  # fmt: skip
    assert f"{n} entries: {n} present, 0 made" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not filled: estimated"):
        main(["features", "--encoder", str(encoder_dir), "--manifest", str(tiny_corpus / "ks" / "dev.jsonl"),
              "--cache_dir", str(tmp_path / "small"), "--max_gb", "1e-9", "--workers", "0"])  # fmt: skip


def test_features_command_is_listed_and_documented(capsys):
    from rewiring.experiment.cli import main

    main(["--help"])
    assert "  features " in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["features", "--help"])
    assert done.value.code == 0 and "--manifest" in capsys.readouterr().out


# ============================================================================ the bench section


def test_bench_section_estimate_and_rendering():
    from benchmarks.features import LARGE_CONFIG, _forward_flops, paper_estimate, render

    est = paper_estimate(read_bytes_per_s=1e9)
    assert est["runs"] == 864 and set(est["tasks"]) == {"asr", "ks", "ic", "sid", "sd", "sf"}
    asr = est["tasks"]["asr"]
    # a frame of wav2vec2-large is 25 x 1024 fp16 values; LibriSpeech's 110.9 h are about 1 TB per arm
    assert asr["cache_gb_per_arm"] == pytest.approx(110.9 * 3600 * 50 * 25 * 1024 * 2 / 1e9)
    assert _forward_flops(LARGE_CONFIG, 2, 10.0) == pytest.approx(2 * _forward_flops(LARGE_CONFIG, 1, 10.0))
    assert est["live_h"] == pytest.approx(sum(r["live_h"] for r in est["tasks"].values()))
    case = {"batch": 16, "hidden_states": 5, "hidden_size": 128, "speedup": 4.0,
            "live_step_s": {"median": 0.2, "q1": 0.19, "q3": 0.21, "min": 0.18, "max": 0.22, "n": 4},
            "cached_step_s": {"median": 0.05, "q1": 0.04, "q3": 0.06, "min": 0.04, "max": 0.06, "n": 4},
            "fill": {"audio_s": 100.0, "seconds": 2.0, "entries": 10}, "entry_bytes_per_audio_s": 64000,
            "read": {"bytes_per_s": 1e9}}  # fmt: skip
    text = "\n".join(render({"device": "cpu", "cases": {"tiny": case}, "paper": est}))
    assert "| tiny (5 x 128), batch 16 | 200" in text and "4.00×" in text
    assert "Estimate, not a measurement" in text and "exceed max_gb=100" in text
