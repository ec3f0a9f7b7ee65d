"""Audio loading: channels, rates, cropping, every kind of bad file, and padding."""

import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from rewiring.audio import (
    MIN_SAMPLES,
    REASONS,
    SAMPLE_RATE,
    AudioError,
    Skipped,
    WaveBatch,
    check_waveform,
    duration_seconds,
    load_audio,
    load_or_skip,
    pad_batch,
)
from rewiring.manifest import Record


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else x


def write(path, data, rate, subtype="PCM_16"):
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def test_mono_16k(tmp_path):
    p = write(tmp_path / "a.wav", tone(0.5, 16000), 16000)
    wav = load_audio(p)
    assert wav.dtype == torch.float32 and wav.dim() == 1 and wav.shape[0] == 8000
    assert 0.45 < float(wav.abs().max()) < 0.55
    assert duration_seconds(p) == pytest.approx(0.5)


def test_stereo_is_mean_of_channels(tmp_path):
    data = tone(0.25, 16000, channels=2)
    p = write(tmp_path / "st.wav", data, 16000, subtype="FLOAT")
    wav = load_audio(p)
    assert wav.shape == (4000,)
    torch.testing.assert_close(wav, torch.from_numpy(data.mean(axis=1)))


@pytest.mark.parametrize("rate", [8000, 44100, 22050])
def test_resample_to_16k(tmp_path, rate):
    p = write(tmp_path / f"r{rate}.wav", tone(0.5, rate, channels=2), rate)
    wav = load_audio(p)
    assert abs(wav.shape[0] - 8000) <= 1
    assert 0.3 < float(wav.abs().max()) < 0.6


def test_other_target_rate(tmp_path):
    p = write(tmp_path / "a.wav", tone(0.5, 16000), 16000)
    assert abs(load_audio(p, sample_rate=8000).shape[0] - 4000) <= 1


def test_crop(tmp_path):
    x = np.arange(16000, dtype=np.float32) / 16000.0  # a ramp: position is readable from the value
    p = write(tmp_path / "ramp.wav", x, 16000, subtype="FLOAT")
    wav = load_audio(p, offset=0.25, duration=0.5)
    assert wav.shape[0] == 8000
    assert float(wav[0]) == pytest.approx(0.25, abs=1e-4)
    assert load_audio(p, offset=0.75).shape[0] == 4000


def test_crop_with_resampling_has_exact_length(tmp_path):
    p = write(tmp_path / "c.wav", tone(1.0, 44100), 44100)
    assert load_audio(p, offset=0.1, duration=0.3).shape[0] == 4800


def test_bad_crop_arguments(tmp_path):
    p = write(tmp_path / "a.wav", tone(0.2, 16000), 16000)
    with pytest.raises(ValueError):
        load_audio(p, offset=-1.0)
    with pytest.raises(ValueError):
        load_audio(p, duration=0.0)


def _truncated(path, seconds: float = 3.49, keep: int = 28):
    """A WAV cut off after `keep` samples: its header still promises `seconds` (a broken download)."""
    full = path.with_name("full-" + path.name)
    write(full, tone(seconds, 16000), 16000)
    path.write_bytes(full.read_bytes()[: 44 + 2 * keep])
    return path


def _bad_files(tmp_path):
    """name -> (path, reason code, words expected in the reason, extra load kwargs)."""
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a RIFF file at all" * 10)
    nan = tone(0.2, 16000)
    nan[100] = np.nan
    stereo = tone(0.5, 16000)
    return {
        "missing": (tmp_path / "missing.wav", "not_found", "file not found", {}),
        "folder": ((tmp_path / "adir.wav"), "unreadable", "a folder", {}),
        "unreadable": (garbage, "unreadable", "unreadable audio (Format not recognised", {}),
        "empty": (
            write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000),
            "too_short",
            "0 samples",
            {},
        ),
        "too_short": (
            write(tmp_path / "short.wav", tone(0.02, 16000), 16000),
            "too_short",
            "320 samples (0.020 s) long, shorter than the encoder's receptive field (min_samples=400)",
            {},
        ),
        "too_short_resampled": (
            write(tmp_path / "short8k.wav", tone(0.02, 8000), 8000),
            "too_short",
            "min_samples=400",
            {},
        ),
        "silent": (write(tmp_path / "silent.wav", np.zeros(1600, np.float32), 16000), "silent", "silent", {}),
        "nan": (write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT"), "nan", "NaN", {}),
        "too_long": (
            write(tmp_path / "long.wav", tone(3.0, 8000), 8000),
            "too_long",
            "audio is 3.0 s long, longer than max_seconds=1",
            {"max_seconds": 1.0},
        ),
        "offset_past_end": (
            write(tmp_path / "p.wav", tone(0.2, 16000), 16000),
            "too_short",
            "no audio at offset 1 s: the file holds 0.20 s",
            {"offset": 1.0},
        ),
        "truncated": (
            _truncated(tmp_path / "cut.wav"),
            "truncated",
            "truncated file: its header promises 3.49 s (55840 frames), but 28 frames (0.00 s) remain",
            {},
        ),
        "duration_mismatch": (
            write(tmp_path / "mis.wav", tone(2.4, 16000), 16000),
            "duration_mismatch",
            "the manifest says 0.1 s, the file holds 2.40 s",
            {"record": Record(id="m", audio="mis.wav", duration=0.1)},
        ),
        "segment_past_end": (
            write(tmp_path / "seg.wav", tone(2.4, 16000), 16000),
            "duration_mismatch",
            "the manifest's segment 2-3 s runs past the file's end (2.40 s)",
            {"record": Record(id="s", audio="seg.wav", duration=1.0, offset=2.0)},
        ),
        "channels_cancel": (
            write(tmp_path / "anti.wav", np.stack([stereo, -stereo], axis=1), 16000, subtype="FLOAT"),
            "channels_cancel",
            "the 2 channels cancel out when averaged",
            {},
        ),
        "no_channel": (
            write(tmp_path / "st2.wav", tone(0.5, 16000, channels=2), 16000),
            "no_channel",
            "channel 2 asked for, but the file has 2 channels",
            {"channel": 2},
        ),
    }


CASES = [
    "missing", "folder", "unreadable", "empty", "too_short", "too_short_resampled", "silent", "nan", "too_long",
    "offset_past_end", "truncated", "duration_mismatch", "segment_past_end", "channels_cancel", "no_channel",
]  # fmt: skip


def _case(tmp_path, case):
    (tmp_path / "adir.wav").mkdir(exist_ok=True)
    return _bad_files(tmp_path)[case]


def test_every_reason_code_has_a_case(tmp_path):
    assert {code for _, code, _, _ in _bad_files(tmp_path).values()} == set(REASONS) - {"bad_audio"}


@pytest.mark.parametrize("case", CASES)
def test_bad_audio_raises_naming_file_reason_and_code(tmp_path, case):
    path, code, words, kw = _case(tmp_path, case)
    with pytest.raises(AudioError) as e:
        load_audio(path, **kw)
    assert str(e.value).startswith(f"{path}: ") and words in str(e.value), str(e.value)
    assert e.value.path == str(path) and e.value.code == code and e.value.reason in str(e.value)
    assert "System error" not in str(e.value)
    with pytest.raises(AudioError):
        load_or_skip(path, "error", **kw)


@pytest.mark.parametrize("case", CASES)
def test_bad_audio_skip_logs_and_returns_its_reason(tmp_path, case, caplog):
    path, code, words, kw = _case(tmp_path, case)
    with caplog.at_level(logging.WARNING, logger="rewiring.audio"):
        skipped = load_or_skip(path, "skip", **kw)
    assert isinstance(skipped, Skipped) and (skipped.path, skipped.code) == (str(path), code)
    assert words in skipped.reason
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(path.name in m and f"({code})" in m and words in m for m in msgs), msgs


def test_skip_passes_good_audio_and_kwargs(tmp_path):
    p = write(tmp_path / "ok.wav", tone(0.5, 8000), 8000)
    wav = load_or_skip(p, "skip", duration=0.25)
    assert isinstance(wav, torch.Tensor) and wav.shape[0] == 4000
    with pytest.raises(ValueError):
        load_or_skip(p, "ignore")


def test_check_false_returns_silence(tmp_path):
    p = write(tmp_path / "silent.wav", np.zeros(1600, np.float32), 16000)
    assert load_audio(p, check=False).shape[0] == 1600
    with pytest.raises(AudioError):  # unreadable files fail whatever `check` says
        load_audio(tmp_path / "nope.wav", check=False)


def test_cropped_long_file_is_fine(tmp_path):
    p = write(tmp_path / "long.wav", tone(3.0, 16000), 16000)
    assert load_audio(p, offset=1.0, duration=0.5, max_seconds=1.0).shape[0] == 8000


def test_too_long_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    p = write(tmp_path / "ten-minutes.wav", np.zeros(16000 * 600, np.int16), 16000, subtype="PCM_16")

    def no_decoding(*a, **k):
        raise AssertionError("decoded a file that its header already rules out")

    monkeypatch.setattr(sf, "read", no_decoding)
    with pytest.raises(AudioError, match="600.0 s long, longer than max_seconds=30") as e:
        load_audio(p, max_seconds=30)
    assert e.value.code == "too_long"
    rec = Record(id="x", audio=p.name, duration=60.0, offset=10.0)  # a segment is bounded by its length
    with pytest.raises(AudioError, match="60.0 s long"):
        load_audio(p, record=rec, max_seconds=30)


def test_a_streamed_wav_with_an_unknown_length_is_not_truncated(tmp_path):
    import struct

    p = write(tmp_path / "piped.wav", tone(0.5, 16000), 16000)
    data = bytearray(p.read_bytes())
    at = data.index(b"data") + 4
    for placeholder in (0xFFFFFFFF, 0x7FFFF000):
        data[at : at + 4] = struct.pack("<I", placeholder)
        p.write_bytes(bytes(data))
        assert load_audio(p).shape[0] == 8000


def test_min_samples_is_the_callers_receptive_field(tmp_path):
    p = write(tmp_path / "short.wav", tone(0.02, 16000), 16000)  # 320 samples
    assert load_audio(p, min_samples=160).shape[0] == 320  # enough for Whisper
    with pytest.raises(AudioError, match="min_samples=400"):
        load_audio(p)  # not for wav2vec2 (the default)
    assert MIN_SAMPLES == 400


def test_duration_within_tolerance_is_accepted(tmp_path):
    p = write(tmp_path / "a.wav", tone(2.4, 16000), 16000)
    assert load_audio(p, record=Record(id="a", audio="a.wav", duration=2.45)).shape[0] == 38400
    with pytest.raises(AudioError, match="the manifest says 2.6 s") as e:
        load_audio(p, record=Record(id="a", audio="a.wav", duration=2.6))
    assert e.value.code == "duration_mismatch"
    assert load_audio(p, record=Record(id="a", audio="a.wav", duration=0.1), check=False).shape[0] == 38400


def test_record_segment_reads_only_its_frames(tmp_path, monkeypatch):
    x = np.arange(48000, dtype=np.float32) / 48000.0  # a ramp: the value says where a sample was read
    p = write(tmp_path / "long.wav", x, 16000, subtype="FLOAT")
    calls = []
    real = sf.read
    monkeypatch.setattr(sf, "read", lambda *a, **k: calls.append((k["start"], k["stop"])) or real(*a, **k))
    rec = Record(id="seg", audio="long.wav", duration=1.0, offset=1.5)
    wav = load_audio(p, record=rec)
    assert calls == [(24000, 40000)] and wav.shape[0] == 16000
    assert float(wav[0]) == pytest.approx(0.5, abs=1e-4)
    # a crop inside the segment is relative to the segment
    wav = load_audio(p, record=rec, offset=0.25, duration=0.5)
    assert calls[-1] == (28000, 36000) and float(wav[0]) == pytest.approx(28000 / 48000, abs=1e-4)


def test_channel_policy(tmp_path):
    left = tone(0.5, 16000)
    right = np.zeros_like(left) + 0.25
    p = write(tmp_path / "lr.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    torch.testing.assert_close(load_audio(p, channel="first"), torch.from_numpy(left))
    torch.testing.assert_close(load_audio(p, channel=1), torch.from_numpy(right))
    torch.testing.assert_close(load_audio(p), torch.from_numpy((left + right) / 2))
    anti = write(tmp_path / "anti.wav", np.stack([left, -left], axis=1), 16000, subtype="FLOAT")
    torch.testing.assert_close(load_audio(anti, channel="first"), torch.from_numpy(left))
    mono = write(tmp_path / "mono.wav", left, 16000, subtype="FLOAT")
    assert load_audio(mono, channel=3).shape == (8000,)  # a mono file has only the one to give
    for bad in ("left", -1, True, 1.5):
        with pytest.raises(ValueError, match="channel must be"):
            load_audio(p, channel=bad)


def test_duration_seconds_says_not_found(tmp_path):
    with pytest.raises(AudioError, match="missing.wav: file not found") as e:
        duration_seconds(tmp_path / "missing.wav")
    assert e.value.code == "not_found"


def test_audio_error_codes():
    import pickle

    assert AudioError("x.wav", "some reason").code == "bad_audio"
    back = pickle.loads(pickle.dumps(AudioError("x.wav", "file not found", "not_found")))
    assert (back.path, back.reason, back.code, str(back)) == (
        "x.wav",
        "file not found",
        "not_found",
        "x.wav: file not found",
    )
    with pytest.raises(ValueError, match="unknown bad-audio code"):
        AudioError("x.wav", "why", "bogus")


def test_check_waveform_direct():
    check_waveform(torch.ones(10) * 0.1, "x.wav")
    with pytest.raises(AudioError, match="x.wav.*inf"):
        check_waveform(torch.tensor([0.1, float("inf")]), "x.wav")
    with pytest.raises(AudioError, match="longer than"):
        check_waveform(torch.full((32001,), 0.1), "x.wav", max_seconds=2.0)


def test_pad_batch_shapes_and_mask():
    wavs = [torch.ones(5), torch.ones(3) * 2, torch.ones(7) * 3]
    b = pad_batch(wavs)
    assert isinstance(b, WaveBatch) and len(b) == 3
    assert b.waveforms.shape == (3, 7) and b.waveforms.dtype == torch.float32
    assert b.lengths.tolist() == [5, 3, 7] and b.lengths.dtype == torch.long
    assert b.attention_mask.dtype == torch.long
    assert b.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert b.attention_mask.sum(1).tolist() == b.lengths.tolist()
    assert float(b.waveforms[1, 3:].abs().sum()) == 0.0
    torch.testing.assert_close(b.waveforms[2], wavs[2])
    assert b.to("cpu").waveforms.shape == (3, 7)


def test_pad_batch_single_and_invalid():
    b = pad_batch([torch.zeros(4, dtype=torch.float64)])
    assert b.waveforms.shape == (1, 4) and b.waveforms.dtype == torch.float32
    assert b.attention_mask.tolist() == [[1, 1, 1, 1]]
    with pytest.raises(ValueError):
        pad_batch([])
    with pytest.raises(ValueError):
        pad_batch([torch.zeros(2, 4)])


def test_sample_rate_constant():
    assert SAMPLE_RATE == 16000


def test_bucket_batch_sampler_covers_everything_with_little_padding():
    from rewiring.audio import BucketBatchSampler

    g = torch.Generator().manual_seed(0)
    durations = (torch.rand(103, generator=g) * 9 + 1).tolist()
    sampler = BucketBatchSampler(durations, batch_size=8, seed=3, drop_last=False)
    first = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(103))
    assert len(first) == len(sampler) == 13
    second = list(sampler)
    assert first != second  # a new shuffle every epoch
    assert first == list(BucketBatchSampler(durations, 8, seed=3, drop_last=False))  # seeded

    def padded(batches):
        return sum(max(durations[i] for i in b) * len(b) for b in batches) / sum(durations)

    shuffled = torch.randperm(103, generator=g).tolist()
    plain = [shuffled[k : k + 8] for k in range(0, 103, 8)]
    assert padded(first) < 1.1 < padded(plain)
    dropped = list(BucketBatchSampler(durations, 8, seed=3, drop_last=True))
    assert all(len(b) == 8 for b in dropped) and len(dropped) == 12
