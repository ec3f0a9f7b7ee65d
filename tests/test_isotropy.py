"""Isotropy measures on distributions with a known answer, the training callback, and encoder profiles."""

import hashlib
import json
import math
import warnings

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch.loggers import Logger

from rewiring.encoder import TINY_CONFIG, SpeechEncoder
from rewiring.isotropy import (
    IsotropyCallback,
    average_cosine,
    effective_rank,
    encoder_profile,
    isoscore,
    isotropy_report,
    partition_isotropy,
    partition_isotropy_centred,
    spectrum,
)
from rewiring.manifest import ids_hash, read_manifest

D = 32
METRICS = {"isoscore", "effective_rank", "partition_isotropy", "partition_isotropy_centred", "average_cosine"}
SMALL = {**TINY_CONFIG, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 32, "conv_dim": [8] * 7, "num_conv_pos_embeddings": 8,
         "num_conv_pos_embedding_groups": 2}  # fmt: skip


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _low_rank(n, d, k, seed=0):
    g = _gen(seed)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g))[0]  # orthonormal columns
    return torch.randn(n, k, generator=g) @ basis.T


def test_isotropic_gaussian():
    # unit expected norm, as for normalised vectors: I(W) is not scale-invariant (see the docstring)
    X = torch.randn(50 * D, D, generator=_gen()) / math.sqrt(D)
    r = isotropy_report(X, sample_size=50 * D)
    assert set(r) == METRICS
    assert r["isoscore"] > 0.95
    assert r["effective_rank"] > 0.98 * D
    assert r["partition_isotropy"] > 0.9 and r["partition_isotropy_centred"] > 0.9
    assert abs(r["average_cosine"]) < 0.02
    # at the default 10 points per dimension the finite-sample bias of IsoScore shows, but stays small
    assert isoscore(X[: 10 * D]) > 0.85


def test_common_offset_kills_cosine_and_partition_isotropy_but_not_the_centred_measures():
    X = torch.randn(10 * D, D, generator=_gen()) + 20.0
    r = isotropy_report(X)
    assert r["average_cosine"] > 0.99
    assert r["partition_isotropy"] < 1e-6 and r["partition_isotropy_centred"] < 1e-6
    assert r["isoscore"] > 0.85 and r["effective_rank"] > 0.95 * D  # they centre first


@pytest.mark.parametrize("k", [1, 4, 8])
def test_low_rank(k):
    X = _low_rank(10 * D, D, k)
    r = isotropy_report(X)
    assert r["effective_rank"] == pytest.approx(k, abs=0.15 * k)
    # equal variance on k of d axes: IsoScore = (k - 1) / (d - 1) exactly; sampling blurs it a little
    assert r["isoscore"] == pytest.approx((k - 1) / (D - 1), abs=0.02)


def test_isoscore_and_effective_rank_are_scale_and_rotation_invariant():
    X = torch.randn(10 * D, D, generator=_gen()) * torch.linspace(0.1, 2.0, D)
    Q = torch.linalg.qr(torch.randn(D, D, generator=_gen(1)))[0]
    for Y in (7.0 * X, X @ Q):
        assert isoscore(Y) == pytest.approx(isoscore(X), rel=1e-6)
        assert effective_rank(Y) == pytest.approx(effective_rank(X), rel=1e-6)  # float32 rotation


def test_partition_isotropy_is_mu_and_viswanath_as_written():
    """Z(c) = sum_w exp(c . w) over the eigenvectors c of W^T W of the raw points, min Z / max Z."""
    X = torch.randn(10 * 6, 6, generator=_gen()) * torch.tensor([0.3, 0.5, 0.7, 0.9, 1.1, 1.3]) + 0.3
    W = X.double().numpy()
    _, C = np.linalg.eigh(W.T @ W)
    C = C * np.where(W.mean(0) @ C < 0, -1.0, 1.0)  # the documented orientation: towards the mean
    Z = np.exp(W @ C).sum(0)
    assert partition_isotropy(X) == pytest.approx(Z.min() / Z.max(), rel=1e-9)
    assert partition_isotropy(X) != pytest.approx(partition_isotropy_centred(X), rel=1e-3)  # two definitions
    Q = torch.linalg.qr(torch.randn(6, 6, generator=_gen(1), dtype=torch.float64))[0]
    assert partition_isotropy(X.double() @ Q) == pytest.approx(partition_isotropy(X), rel=1e-6)  # rotation


def test_partition_isotropy_centred_matches_the_direct_formula_and_neither_overflows():
    X = torch.randn(10 * 6, 6, generator=_gen()) * 0.5 + 0.3
    spec = spectrum(X)
    C = torch.cat([spec.eigenvectors, -spec.eigenvectors], 1)
    Z = torch.exp(spec.points @ C).sum(0)
    assert partition_isotropy_centred(X) == pytest.approx(float(Z.min() / Z.max()), rel=1e-9)
    big = torch.randn(60, 6, generator=_gen()) * 1000.0  # exp() overflows directly
    for measure in (partition_isotropy, partition_isotropy_centred):
        assert math.isfinite(measure(big)) and 0.0 <= measure(big) <= 1.0


def _symmetric_set(a: torch.Tensor) -> torch.Tensor:
    """{+a_i e_i, -a_i e_i}, each point 5 times (10 points per dimension; Z scales, its ratios do not)."""
    return torch.cat([torch.diag(a), -torch.diag(a)]).repeat(5, 1)


def test_partition_isotropy_of_a_symmetric_set_is_exact():
    # both variants find the axes e_i, and Z(+-e_j) = 5 (2 cosh(a_j) + 2 (d - 1))
    a = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)
    exact = (math.cosh(0.5) + 4) / (math.cosh(3.0) + 4)
    assert partition_isotropy(_symmetric_set(a)) == pytest.approx(exact, rel=1e-12)
    assert partition_isotropy_centred(_symmetric_set(a)) == pytest.approx(exact, rel=1e-12)


def test_an_offset_between_the_principal_axes_shows_in_the_raw_definition_only():
    # the symmetric set shifted by m = (1, ..., 1): |m| = 8, but only 1 along each principal axis e_i.
    # Centred: Z(+-e_j) = exp(+-1) 5 (2 cosh(a_j) + 2 (d - 1)), exactly; raw: c ~ m / |m| gives ~exp(-|m|).
    d = 64
    a = torch.linspace(0.5, 1.0, d, dtype=torch.float64)
    X = _symmetric_set(a) + 1.0
    exact = math.exp(-2.0) * (math.cosh(0.5) + d - 1) / (math.cosh(1.0) + d - 1)
    assert partition_isotropy_centred(X) == pytest.approx(exact, rel=1e-9)  # ~0.13: not near 0
    assert partition_isotropy(X) < 1e-3  # near 0: the offset is (almost) an eigenvector of W^T W


def test_average_cosine_uses_distinct_pairs():
    X = torch.eye(2)  # two orthogonal rows: any pair of distinct rows has cosine 0
    with pytest.warns(UserWarning):
        assert average_cosine(X, pairs=100) == 0.0
    Y = torch.randn(10 * D, D, generator=_gen())
    assert average_cosine(Y, seed=1) == average_cosine(Y, seed=1)


def test_fixed_seeded_sample_and_a_warning_when_small():
    X = torch.randn(40 * D, D, generator=_gen()) * torch.linspace(0.5, 1.5, D)
    assert isotropy_report(X) == isotropy_report(X)
    assert spectrum(X).points.shape == (10 * D, D)  # subsampled to 10 per dimension
    assert isotropy_report(X, seed=1) != isotropy_report(X, seed=0)
    with pytest.warns(UserWarning, match="fewer than 10 per dimension"):
        isotropy_report(X[: 5 * D])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        isotropy_report(X[: 10 * D])


def test_degenerate_inputs():
    collapsed = torch.ones(10 * D, D)
    assert isoscore(collapsed) == 0.0 and effective_rank(collapsed) == 0.0
    with pytest.raises(ValueError):
        isotropy_report(torch.randn(1, D))
    with pytest.raises(ValueError):
        isotropy_report(torch.full((10 * D, D), float("nan")))
    assert isotropy_report(np.random.default_rng(0).normal(size=(10 * D, D)))["isoscore"] > 0.85


# ---------------------------------------------------------------------------- callback and profile
@pytest.fixture
def heldout(tmp_path):
    """A manifest of 6 short random-noise utterances of different lengths."""
    rng = np.random.default_rng(0)
    lines = []
    for i, seconds in enumerate([0.5, 0.7, 0.4, 0.6, 0.5, 0.8]):
        wav = (0.1 * rng.standard_normal(int(16000 * seconds))).astype("float32")
        sf.write(tmp_path / f"u{i}.wav", wav, 16000)
        lines.append(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav", "duration": seconds}))
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class _MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    name = "memory"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class _Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = SpeechEncoder(SMALL)

    def training_step(self, batch, batch_idx):
        return self.encoder(batch[0]).pooled.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 8000, generator=_gen()))
        return torch.utils.data.DataLoader(data, batch_size=2)


def test_callback_logs_at_fit_start_and_every_n_steps(heldout):
    torch.manual_seed(0)
    callback = IsotropyCallback(heldout, every_n_steps=2, max_items=5, batch_size=2, layers="all")
    logger = _MemoryLogger()
    module = _Module()
    trainer = L.Trainer(max_steps=3, logger=logger, callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few points per dimension, and Lightning's own notes
        trainer.fit(module)
    assert [step for step, _ in callback.history] == [0, 2]
    first = callback.history[0][1]
    assert {f"isotropy/{m}" for m in METRICS} <= set(first)
    assert {f"isotropy/layer2/{m}" for m in METRICS} <= set(first)
    assert all(math.isfinite(v) for v in first.values())
    assert callback.history[0][1] != callback.history[1][1]  # the weights moved
    logged = [step for step, metrics in logger.rows if "isotropy/isoscore" in metrics]
    assert logged == [0, 2]
    assert module.encoder.training  # measured in eval mode, then restored


def test_encoder_profile_per_layer_json(heldout, tmp_path):
    torch.manual_seed(0)
    folder = SpeechEncoder(SMALL).save_pretrained(tmp_path / "enc")
    out = tmp_path / "reports" / "iso.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = encoder_profile(str(folder), heldout, layers="all", max_items=4, out=str(out), device="cpu")
        again = encoder_profile(str(folder), heldout, layers=[0, -1], max_items=4, device="cpu")
    assert json.loads(out.read_text()) == report
    assert report["items"] == 4 and report["dim"] == 16
    assert set(report["layers"]) == {"0", "1", "2", "average"}
    for entry in report["layers"].values():
        assert set(entry) == {"frames", "pooled"} and set(entry["frames"]) == METRICS
        assert all(math.isfinite(v) for part in entry.values() for v in part.values())
    assert report["frames_sampled"] == min(report["frames_total"], 160)
    chosen = sorted(read_manifest(heldout), key=lambda r: hashlib.sha256(f"0:{r.id}".encode()).hexdigest())[:4]
    assert report["ids_sha256"] == ids_hash(chosen)  # the seeded sample's ids, hashed as manifests do
    assert set(again["layers"]) == {"0", "2", "average"}
    assert again["layers"]["2"] == report["layers"]["2"]  # same seeded sample, same numbers
    with pytest.raises(ValueError, match="out of range"):
        encoder_profile(str(folder), heldout, layers=[3], device="cpu")


def test_encoder_profile_of_a_live_encoder_keeps_its_mode(heldout):
    enc = SpeechEncoder(SMALL, layers="average").train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = encoder_profile(enc, heldout, layers="pooled", max_items=3)
    assert set(report["layers"]) == {"features"} and enc.training
