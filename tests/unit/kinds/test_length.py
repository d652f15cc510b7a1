"""The length-disentangled kind (loss.length_head): chosen by its option, its loss, metrics and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

from bigrm import kinds, options
from bigrm.artifacts.export import save_classifier
from bigrm.config import LossConfig
from bigrm.data.labels import Labels
from bigrm.data.packing import collate
from bigrm.data.pipeline import Dataset
from bigrm.data.sequences import Group
from bigrm.errors import ConfigError
from bigrm.kinds import Length, Scalar
from bigrm.kinds.length import LENGTH_HEAD_KEY, TRAINED_KEY
from bigrm.model.reward_model import RewardModel, load_classifier
from bigrm.objectives.ranking import ranking_loss
from bigrm.training.evaluate import evaluate_rewards
from tests.helpers.groups import random_groups
from tests.unit.objectives.test_length import slow_loss


def data(stepwise: bool = False) -> Dataset:
    return Dataset([], [], [], [], stepwise=stepwise)


def test_loss_length_head_chooses_the_kind_and_refuses_other_heads():
    cfg = options.build({"loss.length_head": True})
    kind = kinds.for_run(cfg.data, cfg.loss, data())
    assert type(kind) is Length and kind.outputs == kinds.outputs_for(cfg.data, cfg.loss) == 2
    assert kind.vector and kind.head_gram
    with pytest.raises(ConfigError, match="loss.length_head: trains on ranked rows"):
        kinds.for_run(cfg.data, cfg.loss, data(stepwise=True))
    rated = options.build({"loss.length_head": True, "data.attributes": ["a"]})
    with pytest.raises(ConfigError, match="loss.length_head"):
        kinds.for_run(rated.data, rated.loss, data())
    with pytest.raises(ConfigError, match="loss.orthogonal_coef: must be >= 0"):
        options.build({"loss.orthogonal_coef": -1.0})
    config = LlamaConfig(num_labels=2)
    kind.record(config)
    assert type(kinds.for_model(LlamaConfig.from_dict(config.to_dict()))) is Length


def groups_with_lengths() -> list[Group]:
    rng = np.random.default_rng(0)
    out = []
    for g in range(3):
        prompt = rng.integers(10, 50, 4)
        seqs = tuple(np.concatenate([prompt, rng.integers(50, 90, int(n))]) for n in rng.integers(1, 9, 3))
        out.append(Group(seqs, f"g{g}", Labels(), starts=(4,) * 3))
    return out


def test_the_loss_is_the_ranking_loss_of_the_sum_plus_its_share_of_the_terms():
    groups, cfg = groups_with_lengths(), LossConfig(length_coef=0.5, orthogonal_coef=2.0)
    kind = Length()
    labels = collate(groups, 0).labels
    n = len(labels.seg_group)
    outputs = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.25, 3.0]], dtype=torch.float64)
    norm = sum(kind.share(g, cfg) for g in groups + groups_with_lengths()[:1])  # the update holds a 4th prompt
    loss, stats, sums = kind.loss(torch.cat([outputs, w @ w.T]), labels, cfg, norm)
    ranking, _ = ranking_loss(outputs.sum(1), labels, cfg, norm.weight_sum, norm.unit_sum)
    terms = slow_loss(outputs.tolist(), labels.seg_length.tolist(), w.tolist(), 0.5, 2.0)
    assert loss.item() == pytest.approx(ranking.item() + 3 / 4 * terms, abs=1e-10, rel=0)
    metrics = kind.train_metrics(sums)
    assert metrics["head_dot"] == pytest.approx(abs(float(w[0] @ w[1])), abs=1e-12) and float(sums[3]) == 3
    evaluated, _, _ = kind.loss(outputs, labels, cfg, None)  # eval: no Gram rows, the micro-batch's own share
    no_dot = slow_loss(outputs.tolist(), labels.seg_length.tolist(), [[1.0], [0.0]], 0.5, 2.0)
    assert evaluated.item() == pytest.approx(ranking_loss(outputs.sum(1), labels, cfg)[0].item() + no_dot, abs=1e-10)


def test_eval_reports_both_outputs_length_correlations_and_rewards_quality():
    groups = groups_with_lengths()

    def model(batch):  # quality: 0, 1, 0, ... ; length: the completion length itself
        n = batch.labels.seg_length.double()
        return torch.stack([torch.arange(len(n), dtype=torch.float64) % 2, n], 1)

    metrics, rewards = evaluate_rewards(
        model, groups, budget=256, window=8, pad_id=0, device=torch.device("cpu"), cfg=LossConfig(), kind=Length()
    )
    assert metrics["length_pearson_length"] == pytest.approx(1.0) and metrics["length_spearman_length"] == 1.0
    assert abs(metrics["length_pearson_quality"]) < 1 and "length_spearman_quality" in metrics
    assert sorted(set(rewards.tolist())) == [0.0, 1.0]


def test_the_export_is_the_quality_row_as_a_plain_one_logit_classifier(tmp_path, llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok, num_labels=2)
    Length().record(classifier.config)
    model = RewardModel(classifier, "sdpa", vector=True).eval()
    groups = random_groups(1, 200, n_groups=3)
    with torch.no_grad():
        expected = Length().export_values(model(collate(groups, tok.pad_token_id)))
    save_classifier(classifier, classifier.state_dict(), tok, tmp_path, kind=Length())
    config = json.loads((tmp_path / "config.json").read_text())
    assert TRAINED_KEY not in config and config[LENGTH_HEAD_KEY]["weight"] == classifier.score.weight[1].tolist()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert plain.config.num_labels == 1 and type(kinds.for_model(plain.config)) is Scalar
    got = Scalar().plain_rewards(tmp_path, [s.tolist() for g in groups for s in g.seqs], "cpu")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
