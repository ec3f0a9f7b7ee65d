"""Audio loading: channels, rates, cropping, every kind of bad file, and padding."""

import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from rewiring.audio import (
    SAMPLE_RATE,
    AudioError,
    WaveBatch,
    check_waveform,
    duration_seconds,
    load_audio,
    load_or_skip,
    pad_batch,
)


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


def _bad_files(tmp_path):
    """name -> (path, words expected in the reason, extra load kwargs)."""
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a RIFF file at all" * 10)
    nan = tone(0.2, 16000)
    nan[100] = np.nan
    return {
        "missing": (tmp_path / "missing.wav", "unreadable", {}),
        "unreadable": (garbage, "unreadable", {}),
        "empty": (write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000), "empty", {}),
        "silent": (write(tmp_path / "silent.wav", np.zeros(1600, np.float32), 16000), "silent", {}),
        "nan": (write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT"), "NaN", {}),
        "too_long": (
            write(tmp_path / "long.wav", tone(3.0, 8000), 8000),
            "longer than",
            {"max_seconds": 1.0},
        ),
        "offset_past_end": (write(tmp_path / "short.wav", tone(0.2, 16000), 16000), "empty", {"offset": 1.0}),
    }


CASES = ["missing", "unreadable", "empty", "silent", "nan", "too_long", "offset_past_end"]


@pytest.mark.parametrize("case", CASES)
def test_bad_audio_raises_naming_file(tmp_path, case):
    path, words, kw = _bad_files(tmp_path)[case]
    with pytest.raises(AudioError) as e:
        load_audio(path, **kw)
    assert path.name in str(e.value) and words in str(e.value)
    assert e.value.path == str(path)
    with pytest.raises(AudioError):
        load_or_skip(path, "error", **kw)


@pytest.mark.parametrize("case", CASES)
def test_bad_audio_skip_logs_and_returns_none(tmp_path, case, caplog):
    path, words, kw = _bad_files(tmp_path)[case]
    with caplog.at_level(logging.WARNING, logger="rewiring.audio"):
        assert load_or_skip(path, "skip", **kw) is None
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(path.name in m and words in m for m in msgs), msgs


def test_skip_passes_good_audio_and_kwargs(tmp_path):
    p = write(tmp_path / "ok.wav", tone(0.5, 8000), 8000)
    wav = load_or_skip(p, "skip", duration=0.25)
    assert wav is not None and wav.shape[0] == 4000
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
