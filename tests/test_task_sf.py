"""SF: the Audio SNIPS (SUPERB split) adapter on a tiny folder in the real layout, tagging, the module."""


import numpy as np
import pytest
import soundfile as sf

from rewiring.manifest import read_manifest
from tasks import sf as sf_task
from tasks.metrics import SlotTypeF1, SlotValueCER

SR = 16000


def _clip(path, seconds=0.3):
    t = np.arange(int(seconds * SR)) / SR
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 330 * t)).astype("float32"), SR)


# Lines as s3prl's snips_preprocess.py writes all.iob.snips.txt: "%s BOS %s EOS\tO %s %s".
_UTTS = {
    "train": ("PLAY THE BEATLES ON SPOTIFY ?", "O artist artist O service O", "PlayMusic"),
    "valid": ("WHAT IS THE WEATHER IN NEW YORK", "O O O O O city city", "GetWeather"),
    "test": (
        "ADD ROCK & ROLL TO MY PLAYLIST",
        "O playlist playlist playlist O playlist_owner O",
        "AddToPlaylist",
    ),
}
_VOICES = {"train": ["Ivy", "Salli"], "valid": ["Amy"], "test": ["Brian"]}


def _snips(root):
    lines = []
    for split, (words, tags, intent) in _UTTS.items():
        for voice in _VOICES[split] + ["Aditi" if split == "train" else "Joey"]:  # one voice of another split
            uid = f"{voice}-snips-{split}-0"
            lines.append(f"{uid} BOS {words} EOS\tO {tags} {intent}\n")
            _clip(root / split / f"{uid}.wav")
    _clip(root / "train" / "Ivy-snips-train-99.wav")  # a wav without a transcript line: skipped
    (root / "all.iob.snips.txt").write_text("".join(lines))
    (root / "slots.txt").write_text("O\nartist\nservice\ncity\nplaylist\nplaylist_owner")
    return root


def test_iob_to_slots():
    assert sf_task.iob_to_slots(["play", "the", "beatles"], ["O", "artist", "artist"]) == [
        ["artist", "the beatles"]
    ]
    # two runs of one tag separated by O are two slots
    assert sf_task.iob_to_slots(["a", "b", "c"], ["x", "O", "x"]) == [["x", "a"], ["x", "c"]]
    # B-/I- tags: a B- starts a new slot even after the same type
    assert sf_task.iob_to_slots(["a", "b", "c"], ["B-x", "I-x", "B-x"]) == [["x", "a b"], ["x", "c"]]


def test_prepare_snips(tmp_path):
    root = _snips(tmp_path / "SNIPS")
    counts = sf_task.prepare(root, tmp_path / "out")
    assert counts == {"train": 2, "dev": 1, "test": 1}  # voices outside each split's list are left out
    train = read_manifest(tmp_path / "out" / "sf" / "train.jsonl")
    assert [r.id for r in train] == ["Ivy-snips-train-0", "Salli-snips-train-0"]
    r = train[0]
    assert r.text == "play the beatles on spotify"  # lower case, "?" dropped
    assert r.slots == [["artist", "the beatles"], ["service", "spotify"]]
    assert r.labels == {"intent": "PlayMusic"}
    assert r.speaker == "Ivy"
    assert r.duration == pytest.approx(0.3)
    (dev,) = read_manifest(tmp_path / "out" / "sf" / "dev.jsonl")
    assert dev.slots == [["city", "new york"]]
    (test,) = read_manifest(tmp_path / "out" / "sf" / "test.jsonl")
    assert test.text == "add rock and roll to my playlist"  # '&' -> 'and'
    assert test.slots == [["playlist", "rock and roll"], ["playlist_owner", "my"]]


def test_prepare_snips_errors_name_the_file(tmp_path):
    root = _snips(tmp_path / "SNIPS")
    iob = root / "all.iob.snips.txt"
    text = iob.read_text()
    iob.write_text(text + "Ivy-snips-train-5 PLAY IT\tO O\n")
    with pytest.raises(ValueError, match=r"all\.iob\.snips\.txt:8: malformed"):
        sf_task.prepare(root, tmp_path / "out")
    iob.write_text(text + "Ivy-snips-train-5 BOS PLAY IT EOS\tO O PlayMusic\n")
    with pytest.raises(ValueError, match=r"all\.iob\.snips\.txt:8: 2 words but 3 tags"):
        sf_task.prepare(root, tmp_path / "out")
    iob.unlink()
    with pytest.raises(FileNotFoundError, match="all.iob.snips.txt"):
        sf_task.prepare(root, tmp_path / "out")
    iob.write_text(text)
    with pytest.raises(ValueError, match="no wav of speakers"):
        sf_task.prepare(root, tmp_path / "out", test_speakers=["Nobody"])


# ----------------------------------------------------------------------------- tagged targets


def test_tagged_tokens_and_back():
    text = "play the beatles on spotify"
    slots = [["artist", "the beatles"], ["service", "spotify"]]
    tokens = sf_task.tagged_tokens(text, slots)
    assert tokens[:6] == ["p", "l", "a", "y", " ", "<B-artist>"]
    assert "".join(tokens) == "play <B-artist>the beatles<E-artist> on <B-service>spotify<E-service>"
    assert sf_task.parse_tagged("".join(tokens)) == (
        text,
        [("artist", "the beatles"), ("service", "spotify")],
    )
    # a value that is also part of an earlier word is found as a whole word ("in" of "find" is skipped)
    tokens = sf_task.tagged_tokens("find it in paris", [["spatial", "in"]])
    assert "".join(tokens) == "find it <B-spatial>in<E-spatial> paris"
    with pytest.raises(ValueError, match="'r7'.*'rome' not found"):
        sf_task.tagged_tokens("to paris", [["city", "rome"]], record_id="r7")
    with pytest.raises(ValueError, match="not found"):  # out of order
        sf_task.tagged_tokens("a b", [["x", "b"], ["y", "a"]])


def test_parse_tagged_reads_hypotheses_like_s3prl():
    # nested tags are dropped from the outer value; the inner slot is lost (the regex's non-overlap)
    assert sf_task.parse_tagged("<B-x>a <B-y>b<E-y> c<E-x> d") == ("a b c d", [("x", "a b c")])
    # an unclosed tag, a close without open, and an empty value give no slot
    assert sf_task.parse_tagged("<B-x>a b <E-y>c <B-z><E-z>") == ("a b c", [])
    # repeated characters around tags and extra spaces are normalised in text and values
    assert sf_task.parse_tagged("  go <B-city> new  york <E-city>") == ("go new york", [("city", "new york")])


def test_data_module_targets_and_vocabulary(tiny_corpus):
    dm = sf_task.SlotFillingData(root=str(tiny_corpus), batch_size=2)
    dm.setup("validate")
    vocab = dm.spec["vocab"]
    assert vocab[0] == "<blank>"
    tags = [t for t in vocab if t.startswith("<B-")]
    assert tags and all(f"<E-{t[3:-1]}>" in vocab for t in tags)
    rec = next(r for r in dm.records["dev"] if r.slots)
    ids, ref = dm.target(rec)
    assert sf_task.parse_tagged(ref) == (rec.text, [tuple(s) for s in rec.slots])
    assert dm.vocab.decode(ids) == ref  # (every tag of this record is in the train vocabulary)


# ----------------------------------------------------------------------------- the module

@pytest.mark.parametrize("protocol", ["superb", "finetune"])
def test_fast_dev_run(task_cli, tiny_corpus, tmp_path, monkeypatch, protocol):
    monkeypatch.chdir(tmp_path)
    cli = task_cli("sf", tiny_corpus, f"--model.init_args.protocol={protocol}")
    model = cli.model
    assert isinstance(model, sf_task.SlotFilling)
    assert model.primary_metric == "val/slot_type_f1" and model.metric_mode == "max"
    logged = cli.trainer.callback_metrics
    for key in (
        "train/loss",
        "val/slot_type_f1",
        "val/slot_value_cer",
        "val/wer",
        "val/cer",
        "val/slot_type_f1_best",
    ):
        assert key in logged, key
    assert 0.0 <= float(logged["val/slot_type_f1"]) <= 1.0
    groups = {g["name"] for g in model.parameter_groups()}
    assert groups == ({"head"} if protocol == "superb" else {"head", "encoder"})


def test_perfect_hypotheses_score_perfectly(tiny_corpus, tmp_path):
    # The metric path of `step`: references parsed back from the tagged strings, scored against themselves.
    dm = sf_task.SlotFillingData(root=str(tiny_corpus), batch_size=2)
    dm.setup("validate")
    refs = [sf_task.parse_tagged(dm.target(r)[1]) for r in dm.records["dev"]]
    f1, cer = SlotTypeF1(), SlotValueCER()
    f1.update([r[1] for r in refs], [r[1] for r in refs])
    cer.update([r[1] for r in refs], [r[1] for r in refs])
    assert f1.compute().item() == 1.0 and cer.compute().item() == 0.0
