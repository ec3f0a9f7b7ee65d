"""Plan, render and index the embedded corpus: manifests for six tasks plus unlabelled audio.

One numpy Generator, seeded, draws every choice in a fixed order (speakers, texts, prosody,
noise, gain, placement), so a seed fixes the manifests. Audio is rendered in chunks, each in a
fresh process forked from a clean server process, because espeak carries state from one
utterance to the next within a process; so a seed also fixes every audio byte.

The build goes to a hidden sibling folder that is renamed into place at the end, with corpus.json
written last: a folder with corpus.json is complete, and an interrupted build leaves no
half-corpus behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rewiring.corpus import servers
from rewiring.corpus import text as T
from rewiring.corpus.render import NOISES
from rewiring.corpus.voices import Speaker, make_speakers, piper_available

__all__ = [
    "SIZES",
    "SPLITS",
    "TASKS",
    "build_corpus",
    "ensure_corpus",
    "is_embedded_root",
    "prepare_embedded",
    "task_manifest",
]

log = logging.getLogger(__name__)

Size = Literal["tiny", "small", "full"]
TASKS = ("asr", "ks", "ic", "sid", "sd", "sf")
SPLITS = ("train", "dev", "test")
UNLABELLED_SPLITS = ("train", "heldout")
FORMAT_VERSION = 1

# Items per split (train, dev, test); ks counts are per class, sid counts per speaker.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "asr": (24, 8, 8), "ks": (6, 2, 2), "ic": (31, 8, 8), "sid": (3, 1, 1), "sid_speakers": 20,
        "sd": (12, 4, 4), "sf": (21, 7, 7), "unlabelled": (64, 16), "held_speakers": 16,
    },
    "small": {
        "asr": (500, 80, 80), "ks": (30, 6, 6), "ic": (400, 80, 80), "sid": (12, 3, 3), "sid_speakers": 24,
        "sd": (240, 48, 48), "sf": (400, 80, 80), "unlabelled": (1200, 100), "held_speakers": 16,
    },
    "full": {
        "asr": (4000, 400, 400), "ks": (250, 40, 40), "ic": (3000, 400, 400), "sid": (50, 10, 10),
        "sid_speakers": 40, "sd": (2000, 300, 300), "sf": (3000, 400, 400), "unlabelled": (10000, 500),
        "held_speakers": 16,
    },
}  # fmt: skip
KS_CLASSES = (*T.KEYWORDS, T.UNKNOWN, T.SILENCE)
SNR_DB = (5.0, 30.0)
GAIN_DB = (-18.0, -1.0)


def task_manifest(root: str | Path, task: str, split: str) -> Path:
    """root/<task>/<split>.jsonl; `task` may also be "unlabelled" (splits train, heldout)."""
    splits = UNLABELLED_SPLITS if task == "unlabelled" else SPLITS
    if task not in (*TASKS, "unlabelled"):
        raise ValueError(f"unknown task {task!r}; one of {', '.join((*TASKS, 'unlabelled'))}")
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {task}; one of {', '.join(splits)}")
    return Path(root) / task / f"{split}.jsonl"


# ---------------------------------------------------------------- planning


class _Planner:
    """Draws the whole corpus (records without durations, and render specs) from one Generator."""

    def __init__(self, out: Path, size: str, seed: int, with_piper: bool) -> None:
        self.out = out
        self.spec = SIZES[size]
        self.rng = np.random.default_rng(seed)
        speakers = make_speakers(self.rng, with_piper=with_piper)
        espeak = [s for s in speakers if s.backend == "espeak"]
        order = [espeak[i] for i in self.rng.permutation(len(espeak))]
        held = self.spec["held_speakers"]
        self.speakers = speakers
        self.pools: dict[str, list[Speaker]] = {
            "test": sorted(order[:held], key=lambda s: s.id),
            "dev": sorted(order[held : 2 * held], key=lambda s: s.id),
            "train": sorted(order[2 * held :], key=lambda s: s.id)
            + [s for s in speakers if s.backend == "piper"],
        }
        # sid: its own closed set of speakers, heard in all three of its splits
        self.sid_speakers = sorted(order[2 * held : 2 * held + self.spec["sid_speakers"]], key=lambda s: s.id)
        self.used: set[str] = set()  # sentences already said anywhere: asr, sid, sd, unlabelled never repeat
        self.held_texts: set[str] = set()  # texts of every dev and test item: unlabelled avoids them
        self.entries: dict[tuple[str, str], list[dict]] = {}

    # -- helpers
    def pick(self, seq: list | tuple) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def fresh_sentence(self, max_words: int = 16) -> str:
        while True:
            s = T.sentence(self.rng, max_words=max_words)
            if s not in self.used:
                self.used.add(s)
                return s

    def effects(self, item: dict) -> dict:
        item["noise"] = self.pick(NOISES)
        item["snr_db"] = round(float(self.rng.uniform(*SNR_DB)), 2)
        item["gain_db"] = round(float(self.rng.uniform(*GAIN_DB)), 2)
        item["noise_seed"] = int(self.rng.integers(2**63))
        return item

    def speech(self, speaker: Speaker, text: str) -> dict:
        item = {"kind": "speech", "parts": [speaker.part(self.rng, text)]}
        item["lead"] = round(float(self.rng.uniform(0.05, 0.4)), 3)
        item["tail"] = round(float(self.rng.uniform(0.05, 0.4)), 3)
        return self.effects(item)

    def add(self, task: str, split: str, record: dict, item: dict) -> None:
        entries = self.entries.setdefault((task, split), [])
        rid = f"{task if task != 'unlabelled' else 'unl'}-{split}-{len(entries):05d}"
        item["path"] = str(self.out / "audio" / task / f"{rid}.wav")
        record = {"id": rid, "audio": f"../audio/{task}/{rid}.wav", **record}
        part = item["parts"][0] if item.get("parts") else None
        if part is not None and item["kind"] != "mix":
            record["meta"] = {k: part[k] for k in ("voice", "rate", "pitch", "length_scale") if k in part}
        else:
            record["meta"] = {}
        record["meta"].update(noise=item["noise"], snr_db=item.get("snr_db"), gain_db=item["gain_db"])
        if split != "train" and task != "unlabelled" and record.get("text"):
            self.held_texts.add(record["text"])
        entries.append({"record": record, "item": item})

    def shuffled(self, n: int) -> list[int]:
        return [int(i) for i in self.rng.permutation(n)]

    # -- tasks
    def asr(self) -> None:
        for split, n in zip(SPLITS, self.spec["asr"], strict=True):
            for _ in range(n):
                spk, text = self.pick(self.pools[split]), self.fresh_sentence()
                self.add("asr", split, {"text": text, "speaker": spk.id}, self.speech(spk, text))

    def ks(self) -> None:
        for split, per_class in zip(SPLITS, self.spec["ks"], strict=True):
            planned = []
            for label in KS_CLASSES:
                for _ in range(per_class):
                    if label == T.SILENCE:
                        item = {"kind": "silence", "clip": 1.0}
                        self.effects(item)
                        item["snr_db"] = None
                        item["gain_db"] = round(float(self.rng.uniform(-40.0, -12.0)), 2)
                        planned.append(({"label": label}, item))
                        continue
                    word = label if label != T.UNKNOWN else self.pick(T.UNKNOWN_WORDS)
                    spk = self.pick(self.pools[split])
                    item = {"kind": "keyword", "clip": 1.0, "parts": [spk.part(self.rng, word)]}
                    item["offset"] = round(float(self.rng.uniform(0.0, 1.0)), 3)
                    planned.append(({"label": label, "text": word, "speaker": spk.id}, self.effects(item)))
            for i in self.shuffled(len(planned)):
                self.add("ks", split, *planned[i])

    def ic(self) -> None:
        intents = list(T.IC_INTENTS)
        for split, n in zip(SPLITS, self.spec["ic"], strict=True):
            # train cycles through every intent first, so each label value is in train
            order = self.shuffled(len(intents))
            for k in range(n):
                intent = intents[order[k % len(intents)]] if split == "train" else self.pick(intents)
                spk, text = self.pick(self.pools[split]), T.ic_command(self.rng, intent)
                labels = dict(zip(("action", "object", "location"), intent, strict=True))
                self.add(
                    "ic", split, {"text": text, "speaker": spk.id, "labels": labels}, self.speech(spk, text)
                )

    def sid(self) -> None:
        for split, per_speaker in zip(SPLITS, self.spec["sid"], strict=True):
            planned = [(spk, self.fresh_sentence()) for spk in self.sid_speakers for _ in range(per_speaker)]
            for i in self.shuffled(len(planned)):
                spk, text = planned[i]
                self.add("sid", split, {"text": text, "speaker": spk.id}, self.speech(spk, text))

    def sd(self) -> None:
        for split, n in zip(SPLITS, self.spec["sd"], strict=True):
            pool = [s for s in self.pools[split] if s.backend == "espeak"]  # one backend per process
            for _ in range(n):
                a, b = (pool[int(i)] for i in self.rng.choice(len(pool), size=2, replace=False))
                turns = int(self.rng.integers(2, 5))
                parts = []
                for t in range(turns):
                    spk = (a, b)[t % 2]
                    part = spk.part(self.rng, self.fresh_sentence(max_words=8))
                    overlap = self.rng.random() < 0.5
                    part["overlap"] = round(float(self.rng.uniform(0.1, 0.6)), 3) if overlap else 0.0
                    part["gap"] = 0.0 if overlap else round(float(self.rng.uniform(0.1, 0.8)), 3)
                    part["level_db"] = round(float(self.rng.uniform(-4.0, 4.0)), 2)
                    parts.append(part)
                item = {"kind": "mix", "parts": parts}
                item["lead"] = round(float(self.rng.uniform(0.1, 0.5)), 3)
                item["tail"] = round(float(self.rng.uniform(0.1, 0.5)), 3)
                self.effects(item)
                self.add("sd", split, {"meta": None}, item)

    def sf(self) -> None:
        intents = list(T.SF_INTENTS)
        for split, n in zip(SPLITS, self.spec["sf"], strict=True):
            order = self.shuffled(len(intents))
            for k in range(n):
                intent = intents[order[k % len(intents)]] if split == "train" else self.pick(intents)
                text, slots = T.sf_request(self.rng, intent)
                spk = self.pick(self.pools[split])
                record = {"text": text, "speaker": spk.id, "labels": {"intent": intent}, "slots": slots}
                self.add("sf", split, record, self.speech(spk, text))

    def unlabelled(self) -> None:
        """Train-pool speakers only, texts never said in any dev or test set."""
        seen: set[str] = set()
        for split, n in zip(UNLABELLED_SPLITS, self.spec["unlabelled"], strict=True):
            for _ in range(n):
                r = self.rng.random()
                text = None
                for _try in range(20):
                    if r < 0.15:
                        cand = T.ic_command(self.rng, self.pick(list(T.IC_INTENTS)))
                    elif r < 0.30:
                        cand = T.sf_request(self.rng, self.pick(list(T.SF_INTENTS)))[0]
                    else:
                        break
                    if cand not in self.held_texts and cand not in seen:
                        text = cand
                        break
                if text is None:
                    text = self.fresh_sentence()
                seen.add(text)
                spk = self.pick(self.pools["train"])
                self.add("unlabelled", split, {"text": text}, self.speech(spk, text))

    def plan(self) -> dict[tuple[str, str], list[dict]]:
        for task in (*TASKS, "unlabelled"):
            getattr(self, task)()
        return self.entries


# ---------------------------------------------------------------- building


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One build of a folder at a time, across processes (DDP ranks may all ask for the corpus)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    with open(lock, "a") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _summary(size: str, seed: int, planner: _Planner, records: dict[tuple[str, str], list]) -> dict:
    tasks: dict[str, dict] = {}
    for (task, split), recs in records.items():
        speakers = {r.speaker for r in recs if r.speaker} | {s[0] for r in recs for s in (r.segments or [])}
        tasks.setdefault(task, {})[split] = {
            "items": len(recs),
            "hours": round(sum(r.duration for r in recs) / 3600.0, 4),
            "speakers": len(speakers),
        }
    slot_types = sorted(T.SLOT_VALUES)
    return {
        "format": FORMAT_VERSION,
        "size": size,
        "seed": seed,
        "sample_rate": 16000,
        "piper": any(s.backend == "piper" for s in planner.speakers),
        "tasks": tasks,
        "classes": {
            "ks": list(KS_CLASSES),
            "ic": {
                k: sorted({i[n] for i in T.IC_INTENTS})
                for n, k in enumerate(("action", "object", "location"))
            },
            "sid": [s.id for s in planner.sid_speakers],
            "sf": {"intent": list(T.SF_INTENTS), "slots": slot_types},
        },
        "speakers": {
            "pools": {split: [s.id for s in pool] for split, pool in planner.pools.items()},
            "voices": {s.id: s.to_dict() for s in planner.speakers},
        },
        "vocabulary": len(T.vocabulary()),
    }


def _print_table(summary: dict, seconds: float, megabytes: float, out: Path) -> None:
    rows = [("task", "split", "items", "hours", "speakers")]
    for task, splits in summary["tasks"].items():
        for split, s in splits.items():
            rows.append((task, split, str(s["items"]), f"{s['hours']:.3f}", str(s["speakers"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"embedded corpus ({summary['size']}, seed {summary['seed']}) at {out}")
    for r in rows:
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    hours = sum(s["hours"] for splits in summary["tasks"].values() for s in splits.values())
    print(f"  total: {hours:.2f} h, {megabytes:.1f} MB, built in {seconds:.1f} s")


def _replaceable(out: Path) -> bool:
    """An earlier corpus, complete or partial, and nothing else: safe to delete and rebuild."""
    known = {"audio", "corpus.json", "unlabelled", *TASKS}
    return out.is_dir() and all(p.name in known for p in out.iterdir())


def _build(out: Path, size: str, seed: int, progress: bool, processes: int) -> dict:
    from rewiring.manifest import Record, write_manifest

    if size not in SIZES:
        raise ValueError(f"unknown corpus size {size!r}; one of {', '.join(SIZES)}")
    if out.exists() and not _replaceable(out):
        raise FileExistsError(
            f"refusing to build the embedded corpus into {out}: it holds files that are not part of one "
            f"({', '.join(sorted(p.name for p in out.iterdir())[:5])}); choose an empty or new folder"
        )
    start = time.perf_counter()
    # stale partial builds of this folder (we hold its lock, so they are dead)
    for stale in out.parent.glob(f".{out.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        with_piper = size != "tiny" and piper_available()
        planner = _Planner(tmp, size, seed, with_piper)
        entries = planner.plan()
        chunks = servers.chunks(entries)
        rendered = servers.render(chunks, processes, progress)
        results = dict(zip((it["path"] for chunk in chunks for it in chunk), rendered, strict=True))
        records: dict[tuple[str, str], list] = {}
        for (task, split), group in entries.items():
            recs = []
            for e in group:
                res = results[e["item"]["path"]]
                rec = dict(e["record"], duration=res["duration"])
                if res["segments"] is not None:
                    rec["segments"] = res["segments"]
                    rec["meta"] = dict(
                        rec.get("meta") or {}, speakers=sorted({s[0] for s in res["segments"]})
                    )
                recs.append(Record(**rec))
            records[(task, split)] = recs
            write_manifest(task_manifest(tmp, task, split), recs)
        summary = _summary(size, seed, planner, records)
        megabytes = sum(p.stat().st_size for p in tmp.rglob("*.wav")) / 1e6
        seconds = time.perf_counter() - start
        summary["megabytes"] = round(megabytes, 1)
        summary["build_seconds"] = round(seconds, 1)
        (tmp / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        _print_table(summary, seconds, megabytes, out)
    return summary


def build_corpus(
    out: str | Path, size: Size = "small", seed: int = 0, *, progress: bool = True, processes: int = 2
) -> dict:
    """Generate the embedded corpus into OUT (replacing what is there); returns its summary.

    Args:
        out: the corpus folder (e.g. data/embedded/small).
        size: tiny (tests, seconds), small (the demo, minutes), full.
        seed: fixes every text, voice, noise and audio byte.
        progress: show a progress bar and print the summary table.
        processes: rendering processes.
    """
    out = Path(out).absolute()
    with _locked(out):
        return _build(out, size, seed, progress, processes)


def is_embedded_root(root: str | Path) -> bool:
    """Whether ROOT is shaped like .../embedded/<size>: the stages and tasks build such a folder on first
    use (`ensure_corpus`) instead of failing on a missing manifest."""
    root = Path(root)
    return root.name in SIZES and root.parent.name == "embedded"


def ensure_corpus(root: str | Path) -> Path:
    """ROOT, built first when its corpus.json is missing (ROOT's last folder names the size)."""
    root = Path(root)
    if (root / "corpus.json").is_file():
        return root
    if root.name not in SIZES:
        raise FileNotFoundError(
            f"no embedded corpus at {root} (no corpus.json), and {root.name!r} is not a size "
            f"({', '.join(SIZES)}), so it cannot be built here; use a folder named after the size "
            f"(data/embedded/small) or run: python -m rewiring prepare embedded --out {root} --size small"
        )
    with _locked(root.absolute()):
        if not (root / "corpus.json").is_file():  # another process may have built it meanwhile
            log.warning(
                "building the embedded corpus at %s (size %s, seed 0); this happens once", root, root.name
            )
            _build(root.absolute(), root.name, 0, progress=True, processes=2)
    return root


def prepare_embedded(out: str, size: str = "small", seed: int = 0) -> None:
    """The CLI's `prepare embedded`: build OUT unless it already holds this size and seed."""
    summary_path = Path(out) / "corpus.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if (summary.get("size"), summary.get("seed"), summary.get("format")) == (size, seed, FORMAT_VERSION):
            print(f"embedded corpus ({size}, seed {seed}) already at {out}; delete it to rebuild")
            return
    build_corpus(out, size=size, seed=seed)  # type: ignore[arg-type]
