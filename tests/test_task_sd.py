"""SD: the LibriMix (SUPERB SD Kaldi-style) adapter on a tiny folder in the real layout, labels, the module."""


import numpy as np
import pytest
import soundfile as sf
import torch

from rewiring.manifest import read_manifest
from tasks import sd

SR = 16000


def _clip(path, seconds=1.0, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.1 * rng.standard_normal(int(seconds * SR))).astype("float32"), SR)


def _librimix(root):
    """root/{train,dev,test}/{wav.scp,rttm,reco2dur} pointing at Libri2Mix/wav16k/max/<split>/mix_both wavs.

    Lines as s3prl's LibriMix prepare_diarization.py writes them (rttm: 9 tab-separated fields).
    """
    for split, mix_split in (("train", "train-100"), ("dev", "dev"), ("test", "test")):
        scp, rttm, dur = [], [], []
        for i, (s1, s2) in enumerate(
            [("103-1240-0000", "1034-121119-0049"), ("1040-133433-0001", "1069-133709-0000")]
        ):
            rec = f"{s1}_{s2}"
            wav = root / "Libri2Mix" / "wav16k" / "max" / mix_split / "mix_both" / f"{rec}.wav"
            _clip(wav, seconds=1.0 + i, seed=i)
            scp.append(f"{rec} {wav}\n")
            spk1, spk2 = s1.split("-")[0], s2.split("-")[0]
            for spk, start, end in ((spk1, 0.0, 0.6), (spk2, 0.4, 1.0 + i), (spk1, 0.8, 0.9)):
                rttm.append(f"SPEAKER\t{rec}\t1\t{start}\t{round(end - start, 4)}\t<NA>\t<NA>\t{spk}\t<NA>\n")
            dur.append(f"{rec} {1.0 + i}\n")
        d = root / "data" / split
        d.mkdir(parents=True)
        (d / "wav.scp").write_text("".join(scp))
        (d / "rttm").write_text("".join(rttm))
        (d / "reco2dur").write_text("".join(dur))
    return root / "data"


def test_prepare_librimix(tmp_path):
    data = _librimix(tmp_path)
    counts = sd.prepare(data, tmp_path / "out")
    assert counts == {"train": 2, "dev": 2, "test": 2}
    recs = read_manifest(tmp_path / "out" / "sd" / "dev.jsonl")
    r = recs[0]
    assert r.id == "103-1240-0000_1034-121119-0049"
    assert r.duration == 1.0
    assert r.audio.endswith("dev/mix_both/103-1240-0000_1034-121119-0049.wav")
    # turns sorted by start: 103 [0, 0.6], 1034 [0.4, 1.0], 103 [0.8, 0.9]
    assert r.segments == [["103", 0.0, 0.6], ["1034", 0.4, 1.0], ["103", 0.8, 0.9]]
    assert recs[1].segments[1] == ["1069", 0.4, 2.0]


def test_prepare_librimix_errors_name_the_file(tmp_path):
    data = _librimix(tmp_path)
    (data / "test" / "reco2dur").unlink()
    with pytest.raises(FileNotFoundError, match=r"test/reco2dur: missing reco2dur"):
        sd.prepare(data, tmp_path / "out")
    (data / "test" / "reco2dur").write_text("x_y not-a-number\n")
    with pytest.raises(ValueError, match=r"test/reco2dur:1: expected"):
        sd.prepare(data, tmp_path / "out")
    rttm = data / "dev" / "rttm"
    rttm.write_text(rttm.read_text() + "SPEAKER onlyfour fields\n")
    with pytest.raises(ValueError, match=r"dev/rttm:7: expected an RTTM SPEAKER line"):
        sd.prepare(data, tmp_path / "out")
    rttm.write_text("SPEAKER\tunknown_rec\t1\t0.0\t1.0\t<NA>\t<NA>\t7\t<NA>\n")
    with pytest.raises(ValueError, match=r"missing from wav.scp: unknown_rec"):
        sd.prepare(data, tmp_path / "out")
    wav = next((tmp_path / "Libri2Mix").rglob("train-100/mix_both/*.wav"))
    wav.unlink()
    with pytest.raises(FileNotFoundError, match=wav.name):
        sd.prepare(data, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="LibriMix data folder not found"):
        sd.prepare(tmp_path / "nowhere", tmp_path / "out")


# ----------------------------------------------------------------------------- labels and data


def test_frame_activity_rounds_like_s3prl():
    # 50 frames/s. Turn 1 (column 0): 0.0-0.1 s -> frames round(0)=0 .. round(5)=5 -> 0..4.
    # Turn 2 (column 1): 0.05-0.2 s -> round(2.5)=2 (half to even, as np.rint) .. round(10)=10 -> 2..9.
    # Row 2 is padding only (column -1): no activity.
    turns = torch.tensor([[[0, 0.0, 0.1], [1, 0.05, 0.2]], [[-1, -1, -1], [-1, -1, -1]]])
    act = sd.frame_activity(turns, num_frames=12, frame_rate=50.0, num_speakers=2)
    assert act.shape == (2, 12, 2)
    assert act[0, :, 0].tolist() == [1] * 5 + [0] * 7
    assert act[0, :, 1].tolist() == [0, 0] + [1] * 8 + [0, 0]
    assert act[1].sum() == 0


def _mix_record(rid, duration, segments):
    from rewiring.manifest import Record

    return Record(id=rid, audio=f"{rid}.wav", duration=duration, segments=segments)


def test_speaker_columns_in_order_of_first_turn_and_too_many_speakers():
    dm = sd.SpeakerDiarizationData(root="unused")
    rec = _mix_record("m", 2.0, [["bob", 0.5, 1.0], ["al", 0.0, 0.7], ["bob", 1.2, 1.5]])
    # al speaks first -> column 0
    assert dm.target(rec) == [[0.0, 0.0, 0.7], [1.0, 0.5, 1.0], [1.0, 1.2, 1.5]]
    with pytest.raises(ValueError, match="'m3' has more than 2 speakers"):
        dm.target(_mix_record("m3", 2.0, [["a", 0, 1], ["b", 0, 1], ["c", 0, 1]]))
    batch = dm.collate_targets([dm.target(rec), []])
    assert batch.shape == (2, 3, 3) and batch[1].eq(-1).all()


def test_training_crop_moves_the_turns(tmp_path):
    # A 2 s recording read as a 1 s window: turns shift by the window's offset and are clipped to it.
    _clip(tmp_path / "m.wav", seconds=2.0)
    from rewiring.manifest import write_manifest

    rec = _mix_record("m", 2.0, [["a", 0.0, 0.8], ["b", 0.6, 2.0]])
    rec.audio = "../m.wav"  # relative to the manifest's folder
    write_manifest(tmp_path / "sd" / "train.jsonl", [rec])
    dm = sd.SpeakerDiarizationData(root=str(tmp_path), crop_seconds=1.0)
    dm.records["train"] = [rec]
    torch.manual_seed(0)
    offset = float(torch.rand(())) * (2.0 - 1.0)
    torch.manual_seed(0)
    item = dm.dataset("train")[0]
    assert item.wav.shape[-1] == SR
    expected = []
    for col, s, e in ((0.0, 0.0, 0.8), (1.0, 0.6, 2.0)):
        s2, e2 = max(s - offset, 0.0), min(e - offset, 1.0)
        if e2 > s2:
            expected.append([col, s2, e2])
    assert len(expected) == 2 and torch.allclose(torch.tensor(item.target), torch.tensor(expected))
    # evaluation reads the whole recording
    dm.records["dev"] = [rec]
    assert dm.dataset("dev")[0].wav.shape[-1] == 2 * SR


# ----------------------------------------------------------------------------- the module

@pytest.mark.parametrize("protocol", ["superb", "finetune"])
def test_fast_dev_run(task_cli, tiny_corpus, tmp_path, monkeypatch, protocol):
    monkeypatch.chdir(tmp_path)
    cli = task_cli("sd", tiny_corpus, f"--model.init_args.protocol={protocol}", "--model.init_args.lstm_hidden=32")
    model = cli.model
    assert isinstance(model, sd.SpeakerDiarization)
    assert model.primary_metric == "val/der" and model.metric_mode == "min"
    assert model.frame_rate == 50.0  # 16 kHz / (5 * 2**6)
    logged = cli.trainer.callback_metrics
    for key in ("train/loss", "val/der", "val/der_miss", "val/der_fa", "val/der_conf", "val/der_best"):
        assert key in logged, key
    parts = sum(float(logged[k]) for k in ("val/der_miss", "val/der_fa", "val/der_conf"))
    assert float(logged["val/der"]) == pytest.approx(parts, abs=1e-5)
    groups = {g["name"] for g in model.parameter_groups()}
    assert groups == ({"head"} if protocol == "superb" else {"head", "encoder"})


def test_step_scores_an_oracle_with_either_speaker_order(task_cli, tiny_corpus, tmp_path, monkeypatch):
    """With logits that match the labels (columns swapped: PIT and the DER mapping must not care)."""
    monkeypatch.chdir(tmp_path)
    cli = task_cli("sd", tiny_corpus, "--model.init_args.lstm_hidden=32", run=False)
    model, dm = cli.model, cli.datamodule
    dm.setup("validate")
    model.install_spec(dm.spec)
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        out = model.encoder(batch.waveforms, batch.attention_mask)
    labels = sd.frame_activity(batch.targets, out.features.shape[1], model.frame_rate, 2)
    oracle = (labels[..., [1, 0]] * 2 - 1) * 20.0
    monkeypatch.setattr(model, "logits", lambda b: (oracle, out.frame_mask))
    model.val_metrics.reset()
    loss = model.step(batch, "val")
    assert loss.item() < 1e-6
    assert model.val_metrics["der"].compute().item() == 0.0
    assert int(model.val_metrics["der"].speaker_time) > 0
