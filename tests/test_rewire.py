"""The rewiring stage: NT-Xent against a naive reference, pairs, masks, skips, configs, learning, export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES

from rewiring.encoder import TINY_CONFIG, SpeechEncoder
from rewiring.experiment.train import cli_main
from rewiring.pairs import PairCollate, RewiringDataModule
from rewiring.rewire import RewiringModule, nt_xent
from rewiring.synthesis import EspeakSynthesizer


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """NT-Xent written out term by term: -log(exp(s(i,p)/t) / sum_{k != i} exp(s(i,k)/t)), averaged."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        partner = (i + n) % n2
        sims = [float(torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm())) / t for k in range(n2)]
        denom = sum(math.exp(sims[k]) for k in range(n2) if k != i)
        total += -math.log(math.exp(sims[partner]) / denom)
    return total / n2


def test_nt_xent_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    for t in (0.04, 0.5, 1.0):
        loss, acc = nt_xent(z1, z2, t)
        assert loss.item() == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-5)
        assert 0.0 <= acc.item() <= 1.0


def test_nt_xent_perfect_pairs_give_full_accuracy():
    z1 = torch.eye(4) * 3
    loss, acc = nt_xent(z1, z1.clone(), 0.04)
    assert acc.item() == 1.0
    assert loss.item() < 1e-3


def _dm(manifest: Path, pairing: str, tmp_path: Path, **kw) -> RewiringDataModule:
    dm = RewiringDataModule(
        manifest=str(manifest),
        pairing=pairing,
        synthesizer=EspeakSynthesizer(voice="en-us"),
        cache_dir=str(tmp_path / "tts"),
        batch_size=4,
        num_workers=0,
        **kw,
    )
    dm.setup("fit")
    return dm


def test_twin_pairs_zero_one_span(unlabelled, tmp_path):
    dm = _dm(unlabelled, "twin", tmp_path, span_share=0.2)
    item = dm.dataset[0]
    v1, v2 = item["view1"], item["view2"]
    assert v1.shape == v2.shape
    changed = (v1 != v2).nonzero().flatten()
    zeroed = (v2 == 0) & (v1 != 0)
    assert zeroed.any()
    # one contiguous span, of at most 20% of the samples
    assert changed.max() - changed.min() + 1 <= round(0.2 * len(v1))


def test_neutral_pairs_come_from_the_cache_and_skips_are_counted(unlabelled, tmp_path):
    dm = _dm(unlabelled, "neutral", tmp_path)
    items = [dm.dataset[i] for i in range(len(dm.dataset))]
    good = [it for it in items if isinstance(it, dict)]
    skipped = [it for it in items if not isinstance(it, dict)]
    assert sorted((it.id, it.code) for it in skipped) == [("notext", "no_text"), ("weird", "unsayable")]
    assert len(good) == len(SENTENCES)
    assert dm.dataset.cache.misses == len(SENTENCES)
    dm.dataset[0]
    assert dm.dataset.cache.hits == 1
    # the TTS view is a different waveform, not the utterance itself
    assert good[0]["view1"].shape != good[0]["view2"].shape or not torch.equal(good[0]["view1"], good[0]["view2"])
    dm.set_frame_layout(SpeechEncoder(TINY_CONFIG).frame_layout)  # RewiringModule.setup does this in a fit
    batch = dm.collate(items[:4] + items[-2:])
    assert sorted(batch["skipped"]) == [("notext", "no_text"), ("weird", "unsayable")]
    assert batch["size"] == 4


@pytest.mark.parametrize("pairing", ["neutral", "mixed"])
def test_prefill_says_every_neutral_text_before_training(unlabelled, tmp_path, pairing):
    dm = RewiringDataModule(manifest=str(unlabelled), pairing=pairing, synthesizer=EspeakSynthesizer(voice="en-us"),
                            cache_dir=str(tmp_path / "tts"), batch_size=4, num_workers=0, prefill_workers=2)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    items = [dm.dataset[i] for i in range(len(dm.dataset))]
    neutral = [it for it in items if isinstance(it, dict) and it["kind"] == "neutral"]
    assert neutral and dm.dataset.cache.misses == 0  # training reads every neutral view from the cache
    assert dm.dataset.cache.hits == len(neutral)
    # only the neutral texts were said (the mixed pairing's twin utterances need no TTS)
    assert len(list((tmp_path / "tts").rglob("*.wav"))) == len({it["id"] for it in neutral})
    if pairing == "mixed":
        assert any(isinstance(it, dict) and it["kind"] == "twin" for it in items)


def test_mixed_coin_is_seeded_and_uses_both(unlabelled, tmp_path):
    kinds = [_dm(unlabelled, "mixed", tmp_path, seed=s).dataset.kind for s in (0, 0, 1)]
    recs = [it[0] for it in _dm(unlabelled, "mixed", tmp_path).dataset.items]
    a = [kinds[0](r) for r in recs]
    assert a == [kinds[1](r) for r in recs]
    assert {"twin", "neutral"} <= set(a + [kinds[2](r) for r in recs])


def test_length_rules_skip_and_halve(unlabelled, tmp_path):
    full = _dm(unlabelled, "twin", tmp_path)
    durations = sorted(it[0].duration for it in full.dataset.items)
    limit = durations[len(durations) // 2]
    skipped = _dm(unlabelled, "twin", tmp_path, max_seconds=limit)
    assert len(skipped.too_long) == sum(d > limit for d in durations)
    halved = _dm(unlabelled, "neutral", tmp_path, halve_over=limit)
    n_long = sum(it[0].duration > limit for it in full.dataset.items)
    assert len(halved.dataset) == len(full.dataset) + n_long
    k = next(i for i, it in enumerate(halved.dataset.items) if it[2] == 2)
    first, second = halved.dataset[k], halved.dataset[k + 1]
    whole = full.dataset[[it[0].id for it in full.dataset.items].index(halved.dataset.items[k][0].id)]
    assert first["view1"].shape[0] + second["view1"].shape[0] == whole["view1"].shape[0]
    tts = halved.dataset.cache.get(halved.dataset.items[k][0].text)
    assert torch.equal(torch.cat([first["view2"], second["view2"]]), tts)


def _raw_items(items: list) -> list:
    """A collate that hands the items over as they are (module level: DataLoader workers pickle it)."""
    return items


@pytest.mark.parametrize("bucket,workers", [(False, 0), (False, 2), (True, 2)])
def test_alternate_halving_keeps_one_half_per_utterance_per_epoch(unlabelled, tmp_path, bucket, workers):
    """The authors' halving: one item per utterance; a long one gives its first half at even positions
    of the epoch's order and its second at odd ones (their `batch_id % 2`), through workers and bucketing."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    from rewiring.audio import load_audio
    from rewiring.manifest import audio_path

    full = _dm(unlabelled, "twin", tmp_path)
    whole = {rec.id: load_audio(audio_path(unlabelled, rec)) for rec, _, _ in full.dataset.items}
    limit = sorted(rec.duration for rec, _, _ in full.dataset.items)[len(whole) // 2]
    long = {rec.id for rec, _, _ in full.dataset.items if rec.duration > limit}
    both = _dm(unlabelled, "twin", tmp_path, halve_over=limit)
    alt = _dm(unlabelled, "twin", tmp_path, halve_over=limit, halve_mode="alternate", bucket_by_length=bucket)
    assert len(both.dataset) == len(whole) + len(long) and len(alt.dataset) == len(whole)
    alt.collate, alt.num_workers = _raw_items, workers
    loader = alt.train_dataloader()
    epochs, orders = [], []
    for epoch in range(4):
        _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop does before each epoch
        order = [item for batch in loader for item in batch]
        orders.append([it["id"] for it in order])
        assert len(order) == len(whole) // 4 * 4 and len({it["id"] for it in order}) == len(order)
        halves = []
        for position, item in enumerate(order):
            wav, n = whole[item["id"]], whole[item["id"]].shape[0]
            if item["id"] in long:
                expected = wav[: n // 2] if position % 2 == 0 else wav[n // 2 :]
                halves.append((item["id"], position % 2))
            else:
                expected = wav
            assert torch.equal(item["view1"], expected)
        epochs.append(halves)
    assert all(epochs) and len({tuple(sorted(h)) for h in epochs}) > 1  # the chosen halves change by epoch
    assert {h for e in epochs for _, h in e} == {0, 1}
    if not bucket:  # the order is the epoch's (seeded), so a resumed run sees that epoch's order again
        _set_sampler_epoch(loader, 1)
        assert [it["id"] for batch in loader for it in batch] == orders[1] != orders[0]
    with pytest.raises(ValueError, match="halve_mode"):
        RewiringDataModule(manifest=str(unlabelled), halve_mode="first")


def test_the_paper_recipe_halves_as_the_authors_and_the_default_does_not():
    import contextlib
    import io

    import yaml

    def data(*configs: str) -> dict:
        args = ["fit", "--config", "conf/base.yaml", "--config", "conf/encoder/wav2vec2-large-lv60.yaml"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            cli_main([*args, *(a for c in configs for a in ("--config", c)), "--print_config"])
        return yaml.safe_load(out.getvalue())["data"]["init_args"]

    paper = data("conf/stages/rewire-paper.yaml", "conf/stages/paper/neutral.yaml")
    assert paper["halve_mode"] == "alternate" and paper["halve_over"] == 5.625
    assert data("conf/stages/rewire.yaml")["halve_mode"] == "both"


def test_fast_dev_run_with_the_authors_halving(unlabelled, tmp_path):
    cli_main([*_fit_args(unlabelled, tmp_path, "twin"), "--trainer.fast_dev_run=true",
              "--data.init_args.halve_over=1.0", "--data.init_args.halve_mode=alternate",
              "--data.init_args.bucket_by_length=false", "--data.init_args.num_workers=2"])  # fmt: skip


def test_collate_draws_independent_masks_never_on_padding():
    collate = PairCollate(0.3, 5, 2)
    collate.layout = SpeechEncoder(TINY_CONFIG).frame_layout
    items = [
        {"id": str(i), "kind": "twin", "view1": torch.randn(n), "view2": torch.randn(n)}
        for i, n in enumerate([16000, 24000, 32000])
    ]
    batch = collate(items)
    m1, m2 = batch["view1"]["mask_time_indices"], batch["view2"]["mask_time_indices"]
    assert m1.shape == m2.shape == (3, 99)
    assert not torch.equal(m1, m2)
    assert not m1[0, 49:].any() and not m1[1, 74:].any()


def test_module_embeds_and_loss_is_finite():
    module = RewiringModule(encoder=SpeechEncoder(TINY_CONFIG), temperature=0.1)
    view = {"waveforms": torch.randn(3, 16000), "attention_mask": torch.ones(3, 16000, dtype=torch.long)}
    z = module.embed(view)
    assert z.shape == (3, TINY_CONFIG["hidden_size"])
    loss, _ = nt_xent(z, module.embed(view), 0.1)
    assert torch.isfinite(loss)


BASE = ["--config", "conf/base.yaml", "--config", "conf/encoder/tiny-random.yaml", "--config", "conf/stages/rewire.yaml"]


def _fit_args(manifest: Path, tmp_path: Path, pairing: str) -> list[str]:
    return [
        "fit",
        *BASE,
        f"--data.init_args.manifest={manifest}",
        f"--data.init_args.pairing={pairing}",
        "--data.init_args.synthesizer=rewiring.synthesis.EspeakSynthesizer",
        f"--data.init_args.cache_dir={tmp_path / 'tts'}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        f"--model.init_args.export_dir={tmp_path / 'export'}",
        f"--model.init_args.isotropy_manifest={manifest}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.mark.parametrize("pairing", ["twin", "neutral", "mixed"])
def test_fast_dev_run_each_pairing(unlabelled, tmp_path, pairing):
    cli_main([*_fit_args(unlabelled, tmp_path, pairing), "--trainer.fast_dev_run=true"])


@pytest.mark.slow
def test_short_run_learns_and_exports(unlabelled, tmp_path):
    """A few dozen steps lower the loss and raise the matching accuracy; the export loads in plain HF."""
    cli = cli_main(
        [
            *_fit_args(unlabelled, tmp_path, "neutral"),
            "--trainer.max_steps=40",
            "--trainer.max_epochs=-1",
            "--trainer.log_every_n_steps=1",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'csv'}",
            "--model.init_args.temperature=0.1",
            "--model.init_args.optimizer=torch.optim.AdamW",
            "--model.init_args.optimizer.lr=0.0005",
            "--data.init_args.mask_prob=0.0",
        ]
    )
    import csv

    rows = list(csv.DictReader(open(Path(cli.trainer.logger.log_dir) / "metrics.csv")))
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    acc = [float(r["train/match_acc"]) for r in rows if r.get("train/match_acc")]
    assert len(loss) >= 30
    assert any(key.startswith("isotropy/") for key in rows[0]), "IsotropyCallback logged nothing"
    assert np.mean(loss[-8:]) < np.mean(loss[:8])
    assert np.mean(acc[-8:]) > np.mean(acc[:8])

    from transformers import Wav2Vec2Model

    export = tmp_path / "export"
    hf = Wav2Vec2Model.from_pretrained(export).eval()
    ours = SpeechEncoder(str(export), layers="last").eval()
    x = torch.randn(1, 16000)
    with torch.no_grad():
        assert torch.allclose(ours(x).features, hf(ours._prepare(x, None)[0]).last_hidden_state, atol=1e-5)
    iso = __import__("json").loads((export / "isotropy.json").read_text())
    assert set(iso) >= {"before", "after"}


def test_learning_summary_against_chance():
    from rewiring.rewire import learning_summary

    history = [(i, 2.0 - i / 100, 0.1 if i < 10 else 0.5, 8) for i in range(40)]
    s = learning_summary(history, {"too_long": 1})
    assert s["steps"] == 40 and s["match_acc_chance"] == round(1 / 15, 4)
    assert s["match_acc_first"] == 0.1 and s["match_acc_last"] == 0.5 and s["loss_last"] < s["loss_first"]
    assert learning_summary([], {}) == {"steps": 0, "skipped": {}}


def test_max_items_is_a_fixed_seeded_subset(unlabelled, tmp_path):
    full = _dm(unlabelled, "twin", tmp_path)
    a, b = (_dm(unlabelled, "twin", tmp_path, max_items=5) for _ in range(2))
    ids = [it[0].id for it in a.dataset.items]
    assert len(ids) == 5 and ids == [it[0].id for it in b.dataset.items]  # the same subset every time
    assert set(ids) < {it[0].id for it in full.dataset.items}
    assert ids != [it[0].id for it in _dm(unlabelled, "twin", tmp_path, max_items=5, seed=1).dataset.items]
    with pytest.raises(ValueError, match="max_items"):
        RewiringDataModule(manifest=str(unlabelled), max_items=2, batch_size=4)
