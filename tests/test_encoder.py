"""SpeechEncoder: layers, masks and padding, freezing, and HF export that reloads exactly."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining, Wav2Vec2Model

from rewiring.encoder import TINY_CONFIG, WAV2VEC2_CONV, SpeechEncoder
from rewiring.frames import conv_layout, frame_lengths

ROOT = Path(__file__).resolve().parents[1]
SMALL = {**TINY_CONFIG, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "conv_dim": [16] * 7, "num_conv_pos_embeddings": 16,
         "num_conv_pos_embedding_groups": 4}  # fmt: skip
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
              "feat_proj_dropout": 0.0}  # fmt: skip
STABLE = {**SMALL, "feat_extract_norm": "layer", "do_stable_layer_norm": True}


def _padded(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    wav = torch.randn(len(lengths), width, generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return wav * mask, mask


def test_tiny_config_yaml_matches_the_python_dict():
    """The YAML is TINY_CONFIG less the conv layout, which it gets as the default: wav2vec2-base's."""
    conf = yaml.safe_load((ROOT / "conf/encoder/tiny-random.yaml").read_text())
    enc = conf["model"]["init_args"]["encoder"]
    assert enc["class_path"] == "rewiring.encoder.SpeechEncoder"
    source = enc["init_args"]["source"]
    assert {**source, **WAV2VEC2_CONV} == TINY_CONFIG and WAV2VEC2_CONV.keys().isdisjoint(source)
    defaults = Wav2Vec2Config()
    assert {k: list(getattr(defaults, k)) for k in WAV2VEC2_CONV} == WAV2VEC2_CONV
    assert SpeechEncoder(source).config.to_dict() == SpeechEncoder(TINY_CONFIG).config.to_dict()


def test_tiny_encoder_shapes_rates_and_pooling():
    torch.manual_seed(0)
    enc = SpeechEncoder(TINY_CONFIG).eval()
    assert (enc.num_layers, enc.num_hidden_states, enc.hidden_size) == (4, 5, 128)
    assert conv_layout(enc.config) == enc.conv_layout == ((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
    wav, mask = _padded([16000, 9000], 16000)
    with torch.no_grad():
        out = enc(wav, mask)
    assert out.features.shape == (2, 49, 128) and len(out.hidden_states) == 5
    assert (
        out.frame_mask.sum(1).tolist() == enc.frame_lengths(torch.tensor([16000, 9000])).tolist() == [49, 27]
    )
    assert frame_lengths(enc.config, 16000) == 49
    m = out.frame_mask[..., None].float()
    assert torch.allclose(out.pooled, (out.features * m).sum(1) / m.sum(1))
    assert torch.allclose(out.features, torch.stack(out.hidden_states).mean(0))  # "average" is the default


def test_layer_choices():
    torch.manual_seed(0)
    wav = torch.randn(2, 8000)
    outs = {}
    for layers in (0, 2, -1, "last", "average", "weighted"):
        torch.manual_seed(0)
        with torch.no_grad():
            outs[layers] = SpeechEncoder(SMALL, layers=layers).eval()(wav)
    hs = outs["last"].hidden_states
    assert torch.equal(outs[0].features, hs[0]) and torch.equal(outs[2].features, hs[2])
    assert torch.equal(outs[-1].features, hs[-1]) and torch.equal(outs["last"].features, hs[-1])
    assert torch.allclose(outs["weighted"].features, outs["average"].features, atol=1e-6)  # uniform at init
    # the feature cache hands combine one stacked [L, B, F, D] tensor: the same features and gradients
    stacked, mask = torch.stack(hs), outs["last"].frame_mask
    for layers in (0, -1, "last", "average", "weighted"):
        enc = SpeechEncoder(SMALL, layers=layers)
        a, b = enc.combine(hs, mask), enc.combine(stacked, mask)
        assert torch.allclose(a.features, b.features, atol=1e-6) and torch.allclose(a.pooled, b.pooled, atol=1e-6)
        assert len(a.hidden_states) == len(b.hidden_states) == len(hs)
    enc = SpeechEncoder(SMALL, layers="weighted")
    enc.layer_weights.data = torch.randn(len(hs))
    grads = []
    for given in (hs, stacked):
        enc.zero_grad()
        enc.combine(given, mask).pooled.square().sum().backward()
        grads.append(enc.layer_weights.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
    for bad in (3, -4, "first", True):
        with pytest.raises(ValueError):
            SpeechEncoder(SMALL, layers=bad)


def test_last_hidden_state_is_after_the_final_layer_norm_for_stable_models():
    torch.manual_seed(0)
    enc = SpeechEncoder(STABLE, layers="last").eval()
    wav = torch.randn(1, 8000)
    with torch.no_grad():
        out = enc(wav)
        ref = enc.model(enc._prepare(wav, None)[0])
    assert torch.equal(out.hidden_states[-1], ref.last_hidden_state)


def test_hf_time_masking_and_layerdrop_are_off_in_training_mode():
    torch.manual_seed(0)
    # a source asking HF for heavy masking and LayerDrop: the wrapper must switch both off
    enc = SpeechEncoder({**SMALL, **NO_DROPOUT, "mask_time_prob": 0.5, "layerdrop": 0.5}, layers="average")
    assert enc.config.mask_time_prob == 0.0 and enc.config.layerdrop == 0.0
    assert enc.model.encoder.config is enc.model.config
    assert hasattr(enc.model, "masked_spec_embed")
    wav = torch.randn(2, 8000)
    with torch.no_grad():
        train_out = [enc.train()(wav).features for _ in range(3)]
        eval_out = enc.eval()(wav).features
    for t in train_out:
        assert torch.allclose(t, eval_out, atol=1e-6)


def test_masked_spec_embed_exists_even_when_the_source_disables_masking():
    enc = SpeechEncoder({**SMALL, "mask_time_prob": 0.0})
    mask = torch.zeros(1, 24, dtype=torch.bool)
    mask[0, 3:8] = True
    enc.eval()(torch.randn(1, 8000), mask_time_indices=mask)  # would fail without the embedding
    with pytest.raises(ValueError, match="mask_time_indices"):
        enc(torch.randn(1, 8000), mask_time_indices=torch.zeros(1, 10, dtype=torch.bool))


@pytest.mark.parametrize("config", [SMALL, STABLE], ids=["group-norm", "layer-norm"])
def test_padding_content_is_ignored(config):
    torch.manual_seed(0)
    enc = SpeechEncoder(config).eval()
    wav, mask = _padded([8000, 5000], 8000)
    noisy = wav + (1 - mask) * torch.randn_like(wav)  # garbage in the padding
    with torch.no_grad():
        a, b = enc(wav, mask), enc(noisy, mask)
    assert torch.equal(a.features, b.features) and torch.equal(a.pooled, b.pooled)


def test_attention_mask_only_for_layer_norm_models():
    torch.manual_seed(0)
    group, stable = SpeechEncoder(SMALL).eval(), SpeechEncoder(STABLE).eval()
    assert not group.uses_attention_mask and stable.uses_attention_mask
    # with the attention mask, a padded item encodes like the same item alone (on its real frames)
    wav, mask = _padded([8000, 5000], 8000)
    with torch.no_grad():
        batch = stable(wav, mask)
        alone = stable(wav[1:, :5000])
    n = int(batch.frame_mask[1].sum())
    assert n == alone.features.shape[1]
    assert torch.allclose(batch.features[1, :n], alone.features[0], atol=1e-5)
    assert torch.allclose(batch.pooled[1], alone.pooled[0], atol=1e-5)


def test_normalisation_per_utterance_over_real_samples():
    enc = SpeechEncoder(SMALL)
    wav, mask = _padded([8000, 3000], 8000)
    x, lengths = enc._prepare(3.0 * wav + 1.0, mask)
    assert lengths.tolist() == [8000, 3000]
    assert torch.allclose(x[1, :3000].mean(), torch.tensor(0.0), atol=1e-5)
    assert torch.allclose(x[1, :3000].var(unbiased=False), torch.tensor(1.0), atol=1e-3)
    assert torch.all(x[1, 3000:] == 0)
    raw = SpeechEncoder(SMALL, normalize=False)
    assert torch.equal(raw._prepare(wav, mask)[0], wav)


def test_feature_encoder_freezing():
    frozen_cnn = SpeechEncoder(SMALL, freeze_feature_encoder=True)
    trained_cnn = SpeechEncoder(SMALL, freeze_feature_encoder=False)
    for enc, cnn_trains in ((frozen_cnn, False), (trained_cnn, True)):
        enc.train()
        enc(torch.randn(2, 8000)).pooled.sum().backward()
        cnn = list(enc.model.feature_extractor.parameters())
        assert all(p.requires_grad == cnn_trains for p in cnn)
        assert all((p.grad is not None) == cnn_trains for p in cnn)
        assert all(p.grad is not None for p in enc.model.encoder.parameters())


def test_frozen_encoder_runs_in_eval_mode_without_grad_but_layer_weights_train():
    torch.manual_seed(0)
    enc = SpeechEncoder({**SMALL, "hidden_dropout": 0.5}, layers="weighted", freeze=True)
    enc.train()
    assert enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    wav = torch.randn(2, 8000)
    a, b = enc(wav), enc(wav)
    assert torch.equal(a.features, b.features)  # no dropout
    assert all(not h.requires_grad for h in a.hidden_states)
    a.pooled.sum().backward()
    assert enc.layer_weights.grad is not None and enc.layer_weights.grad.abs().sum() > 0
    # unfreezing (e.g. after N steps) trains the transformer; the CNN follows freeze_feature_encoder
    enc.set_frozen(False)
    assert enc.model.training
    assert all(p.requires_grad for p in enc.model.encoder.parameters())
    assert not any(p.requires_grad for p in enc.model.feature_extractor.parameters())


def test_export_reloads_exactly_and_loads_in_plain_transformers(tmp_path):
    torch.manual_seed(0)
    enc = SpeechEncoder(TINY_CONFIG, layers="average", freeze_feature_encoder=False)
    # move the weights away from their initialisation, as training would
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    enc.eval()
    folder = enc.save_pretrained(tmp_path / "export")
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["mask_time_prob"] == 0.05 and saved["layerdrop"] == 0.0  # the source's own values
    assert enc.config.mask_time_prob == 0.0  # the run's override is back after saving

    wav, mask = _padded([16000, 11000], 16000)
    frames = enc.frame_lengths(torch.tensor([16000, 11000]))
    tmask = torch.zeros(2, int(frames.max()), dtype=torch.bool)
    tmask[0, 5:15] = tmask[1, 20:30] = True
    again = SpeechEncoder(str(folder), layers="average").eval()
    with torch.no_grad():
        for kw in ({}, {"mask_time_indices": tmask}):
            a, b = enc(wav, mask, **kw), again(wav, mask, **kw)
            assert torch.equal(a.features, b.features) and torch.equal(a.pooled, b.pooled)

    plain = Wav2Vec2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = plain(enc._prepare(wav, mask)[0]).last_hidden_state
        ours = enc(wav, mask).hidden_states[-1]
    assert torch.equal(ref, ours)


def test_loads_the_encoder_of_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = Wav2Vec2Config(**{k: v for k, v in SMALL.items() if k != "model_type"})
    pre = Wav2Vec2ForPreTraining(config)
    pre.save_pretrained(tmp_path / "pre")
    enc = SpeechEncoder(str(tmp_path / "pre"))
    for name, p in enc.model.state_dict().items():
        assert torch.equal(p, pre.wav2vec2.state_dict()[name]), name


def test_bad_sources_fail_clearly(tmp_path):
    missing = tmp_path / "no-such-encoder"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        SpeechEncoder(str(missing))
    with pytest.raises(FileNotFoundError, match="not found: not/a/folder"):
        SpeechEncoder("./not/a/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SpeechEncoder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="hiden_size"):
        SpeechEncoder({**SMALL, "hiden_size": 3})
    with pytest.raises(ValueError, match="model_type"):
        SpeechEncoder({**SMALL, "model_type": "bert"})


@pytest.mark.parametrize("model_type", ["hubert", "wavlm"])
def test_other_family_members(model_type, tmp_path):
    torch.manual_seed(0)
    config = {
        k: v for k, v in SMALL.items() if not k.startswith(("num_codevector", "codevector", "proj_code"))
    }
    enc = SpeechEncoder({**config, "model_type": model_type}, layers="weighted").eval()
    wav, mask = _padded([8000, 6000], 8000)
    mask_t = torch.zeros(2, 24, dtype=torch.bool)
    mask_t[:, 2:12] = True
    with torch.no_grad():
        out = enc(wav, mask, mask_time_indices=mask_t)
        plain = enc(wav, mask)
    assert out.features.shape == (2, 24, 32) and out.frame_mask.sum(1).tolist() == [24, 18]
    assert not torch.equal(out.features, plain.features)
    again = SpeechEncoder(str(enc.save_pretrained(tmp_path / model_type)), layers="weighted").eval()
    with torch.no_grad():
        assert torch.equal(again(wav, mask).features, plain.features)


def test_fingerprint_follows_the_weights(tmp_path):
    torch.manual_seed(0)
    enc = SpeechEncoder(SMALL)
    fp = enc.fingerprint()
    assert len(fp) == 64 and fp == enc.fingerprint()
    assert SpeechEncoder(str(enc.save_pretrained(tmp_path / "e"))).fingerprint() == fp  # export keeps it
    with torch.no_grad():
        next(enc.model.parameters()).view(-1)[0] += 1e-3
    assert enc.fingerprint() != fp
