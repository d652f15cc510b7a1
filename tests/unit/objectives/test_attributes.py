"""Multi-attribute reward heads: the loss against a Python loop (masked ratings, fp64, gradients), the merged 1-logit
export against the N-head export, LoRA/QLoRA with N heads, and one 2-rank ZeRO-3 run on the synthetic task whose
eval, export, merge, score and eval are all checked."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bigrm import options
from bigrm.artifacts import export
from bigrm.config import LoraConfig, LossConfig, QuantizationConfig, attribute_weights
from bigrm.data.examples import Example
from bigrm.data.labels import Labels
from bigrm.data.packing import SegmentLabels, collate
from bigrm.data.sequences import Group
from bigrm.errors import ConfigError, ExportError
from bigrm.kinds import Attributes
from bigrm.kinds.attributes import MERGED_KEY
from bigrm.model import adapters
from bigrm.model.heads import AttributeHead, merged_head, read_head, record_head
from bigrm.model.reward_model import RewardModel, load_classifier
from bigrm.training.meter import Meter
from tests.helpers.attributes import NAMES, plain_logits
from tests.helpers.groups import random_groups

NAN = math.nan


def make_labels() -> tuple[list[Labels], list[int]]:
    """Rated single completions, a ranked prompt with ties and partial ratings, an unrated pair; varied weights."""
    labels = [
        Labels((0,), weight=1.0, attributes=((3.0, NAN, 1.0),)),
        Labels((0,), weight=2.0, attributes=((NAN, 4.0, 0.0),)),
        Labels((0, 1, 1, 2), weight=0.5, attributes=((4.0, 3.0, NAN), (NAN, NAN, NAN), (1.0, 0.0, 2.0), (0, 2, 4))),
        Labels((0, 1), weight=1.5, attributes=((NAN,) * 3, (NAN,) * 3)),
        Labels((0,), weight=1.0, attributes=((2.0, 2.0, 3.0),)),
    ]
    return labels, [len(lab.ranks) for lab in labels]


HEAD = AttributeHead(NAMES, (1.0, 0.5, -0.25), (2.0, 1.5, 2.5), (1.5, 0.5, 2.0))
KIND = Attributes(HEAD)


def reference_loss(values: torch.Tensor, labels: list[Labels], head: AttributeHead, coef: float) -> torch.Tensor:
    """the attributes kind's loss, one pair and one rating at a time (pairwise, per_prompt)."""
    rows, at = [], 0
    for lab in labels:
        rows.append(list(range(at, at + len(lab.ranks))))
        at += len(lab.ranks)
    reward = [sum(head.weights[a] * values[i, a] for a in range(len(NAMES))) for i in range(at)]
    ranking = 0.0
    for lab, idx in zip(labels, rows, strict=True):
        pairs = [(i, j) for i in range(len(idx)) for j in range(len(idx)) if lab.ranks[i] < lab.ranks[j]]
        if pairs:
            terms = [torch.nn.functional.softplus(-(reward[idx[i]] - reward[idx[j]])) for i, j in pairs]
            ranking = ranking + lab.weight * sum(terms) / len(pairs)
    ranking = ranking / sum(lab.weight for lab in labels)
    rating = 0.0
    for a in range(len(NAMES)):
        num, den = 0.0, 0.0
        for lab, idx in zip(labels, rows, strict=True):
            for k, i in enumerate(idx):
                x = lab.attributes[k][a]
                if not math.isnan(x):
                    num = num + lab.weight * (values[i, a] - (x - head.mean[a]) / head.std[a]) ** 2
                    den += lab.weight
        rating = rating + (num / den if den else 0.0)
    return ranking + coef * rating / len(NAMES)


def test_loss_and_gradients_equal_a_python_loop_with_masked_ratings():
    labels, ks = make_labels()
    cfg = LossConfig(attribute_coef=0.7)
    values = torch.randn(sum(ks), len(NAMES), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got_v = values.clone().requires_grad_(True)
    loss, _, sums = KIND.loss(got_v, SegmentLabels.of(labels, ks, torch.float64), cfg, None)
    loss.backward()
    ref_v = values.clone().requires_grad_(True)
    expected = reference_loss(ref_v, labels, HEAD, 0.7)
    expected.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_v.grad, ref_v.grad, atol=1e-12, rtol=1e-12)
    assert (got_v.grad[[4, 5, 6, 7]] != 0).any(1).all()  # unrated pair: the ranking term alone reaches it
    # missing ratings get no gradient from the rating term: the rated row's NaN column stays untouched
    assert got_v.grad[0, 1] == 0 and got_v.grad[1, 0] == 0
    # Σ w over present ratings: the ranked prompt (weight 0.5) has 3, 3 and 2 of its 4 completions rated
    assert sums[1].tolist() == [1.0 + 3 * 0.5 + 1.0, 2.0 + 3 * 0.5 + 1.0, 1.0 + 2.0 + 2 * 0.5 + 1.0]


def test_step_denominators_make_micro_batches_add_up_to_the_step():
    labels, ks = make_labels()
    cfg = LossConfig()
    values = torch.randn(sum(ks), len(NAMES), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole, _, sums = KIND.loss(values, SegmentLabels.of(labels, ks, torch.float64), cfg, None)
    groups = [
        Group(tuple(np.zeros(2, np.int64) for _ in range(k)), "g", lab) for lab, k in zip(labels, ks, strict=True)
    ]
    norm = sum(KIND.share(g, cfg) for g in groups)
    np.testing.assert_allclose(norm.term, sums[1].numpy())
    parts = 0.0
    for lo, hi in ((0, 2), (2, 5)):
        seg = sum(ks[:lo]), sum(ks[:hi])
        part, _, _ = KIND.loss(
            values[seg[0] : seg[1]], SegmentLabels.of(labels[lo:hi], ks[lo:hi], torch.float64), cfg, norm
        )  # fmt: skip
        parts = parts + part
    torch.testing.assert_close(parts, whole, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4], [0, 1, 4]], ids=["mixed", "rated-only"])
def test_the_logged_loss_is_the_loss_minimised_and_absent_figures_stay_absent(rows):
    """loss = ranking + attribute_coef * rating term, each logged alone; rated rows alone have no pair figures."""
    labels, ks = make_labels()
    labels, ks = [labels[i] for i in rows], [ks[i] for i in rows]
    cfg = LossConfig(attribute_coef=0.7)
    values = torch.randn(sum(ks), len(NAMES), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seg = SegmentLabels.of(labels, ks, torch.float64)
    loss, stats, sums = KIND.loss(values, seg, cfg, None)
    meter = Meter(torch.device("cpu"), 64, None, KIND)
    meter.add(stats, SimpleNamespace(real_tokens=1, processed_tokens=1), 0.0, sums)
    logged = meter.read(cfg, 1e-5)
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert logged["rating_loss"] > 0
    if len(rows) == 3:
        assert not {"pairwise_accuracy", "kendall_tau", "num_pairs", "ranking_loss"} & set(logged)
        assert logged["loss"] == pytest.approx(0.7 * logged["rating_loss"], rel=1e-12)
    else:
        assert logged["loss"] == pytest.approx(logged["ranking_loss"] + 0.7 * logged["rating_loss"], rel=1e-12)
        assert 0 <= logged["pairwise_accuracy"] <= 1 and logged["num_pairs"] > 0


def test_merged_head_rows_and_bias_give_the_weighted_sum():
    gen = torch.Generator().manual_seed(2)
    weight, bias, hidden = (
        torch.randn(3, 8, generator=gen),
        torch.randn(3, generator=gen),
        torch.randn(5, 8, generator=gen),
    )
    w, b = merged_head(weight, bias, HEAD)
    torch.testing.assert_close(hidden @ w.T + b, HEAD.scalar(hidden @ weight.T + bias)[:, None], atol=1e-6, rtol=1e-6)


def test_config_checks():
    with pytest.raises(ConfigError, match="1 weight"):
        options.build({"data.attributes": ["a", "b"], "loss.attribute_weights": [1.0]})
    with pytest.raises(ConfigError, match="distinct"):
        options.build({"data.attributes": ["a", "a"]})
    with pytest.raises(ConfigError, match="data.\\*_column"):
        options.build({"data.attributes": ["prompt"]})
    with pytest.raises(ConfigError, match="1 to 3"):
        options.build({"data.synthetic.task": "attributes"})
    with pytest.raises(ConfigError, match="attribute_targets"):
        options.build({"loss.attribute_targets": "zscore"})
    cfg = options.build({"data.attributes": ["a", "b"]})
    assert attribute_weights(cfg.data.attributes, cfg.loss) == (1.0, 1.0)
    stats = {"mean": [2.0, 3.0], "std": [1.5, 0.5]}
    head = AttributeHead.of(cfg.data.attributes, cfg.loss, stats)
    assert head == AttributeHead(("a", "b"), (1.0, 1.0), (2.0, 3.0), (1.5, 0.5))
    raw = options.build({"data.attributes": ["a", "b"], "loss.attribute_targets": "raw"})
    head = AttributeHead.of(raw.data.attributes, raw.loss, stats)
    assert head.targets(torch.tensor([[4.0, NAN]])).tolist()[0][0] == 4.0


def attribute_classifier(path, bits: int = 0, lora: bool = False):
    """A 3-output classifier with random head (and adapters), its head recorded in its config."""
    tok = AutoTokenizer.from_pretrained(path)
    quant = QuantizationConfig(bits=bits) if bits else None
    classifier = load_classifier(str(path), torch.float32, "sdpa", tok, quant=quant, num_labels=3)
    record_head(classifier.config, HEAD)
    if lora:
        adapters.add_lora(classifier, LoraConfig(r=4))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in classifier.named_parameters():
            if "lora_B" in name or name.startswith("score."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return classifier.eval(), tok


def test_n_head_export_and_merged_export_load_in_plain_transformers(llama_dir, tmp_path):
    classifier, tok = attribute_classifier(llama_dir)
    groups = random_groups(4, 400, n_groups=3)
    with torch.no_grad():
        packed = RewardModel(classifier, "sdpa", vector=True)(collate(groups, tok.pad_token_id))
    export.save_classifier(classifier, classifier.state_dict(), tok, tmp_path / "heads", kind=KIND)
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["id2label"] == {"0": "helpfulness", "1": "correctness", "2": "verbosity"}
    assert config["problem_type"] == "regression" and config["bigrm_attributes"]["weights"] == [1.0, 0.5, -0.25]
    heads = plain_logits(tmp_path / "heads", groups)
    assert packed.shape == heads.shape == (sum(len(g.seqs) for g in groups), 3)
    torch.testing.assert_close(packed, heads, atol=1e-5, rtol=0)

    merged_kind = KIND.merge(classifier)
    export.save_classifier(classifier, classifier.state_dict(), tok, tmp_path / "merged", kind=merged_kind)
    merged = plain_logits(tmp_path / "merged", groups, num_labels=1)
    assert merged.shape[1] == 1 and read_head(classifier.config) is None
    assert AttributeHead.from_dict(json.loads((tmp_path / "merged" / "config.json").read_text())[MERGED_KEY]) == HEAD
    torch.testing.assert_close(merged[:, 0], HEAD.scalar(heads), atol=1e-5, rtol=0)
    with pytest.raises(ExportError, match="scalar head"):
        merged_kind.merge(classifier)


@pytest.mark.parametrize("bits", [0, 4])
def test_lora_and_qlora_train_save_and_merge_n_heads(llama_dir, bits):
    classifier, tok = attribute_classifier(llama_dir, bits=bits, lora=True)
    assert classifier.score.weight.shape[0] == 3 and classifier.score.weight.requires_grad
    groups = random_groups(5, 400, n_groups=3)
    model = RewardModel(classifier, "sdpa", vector=True)
    batch = collate(groups, tok.pad_token_id)
    ks = [len(g.seqs) for g in groups]
    ratings = [Labels(tuple(range(k)), attributes=tuple((float(i), NAN, 1.0) for i in range(k))) for k in ks]
    loss, _, _ = KIND.loss(model.train()(batch), SegmentLabels.of(ratings, ks), LossConfig(), None)
    loss.backward()
    assert classifier.score.weight.grad[[0, 2]].abs().sum(1).min() > 0  # every rated output's row trains
    assert any(
        "lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in classifier.named_parameters()
    )
    trained = {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}
    assert trained["score.weight"].shape[0] == 3
    settings = adapters.Settings(str(llama_dir), LoraConfig(r=4), QuantizationConfig(bits=bits))
    merged = export.adapted_classifier(settings, trained, torch.float32, tok, merged=True)
    model.eval()
    with torch.no_grad():
        adapted = model(batch)
        record_head(merged.config, HEAD)
        torch.testing.assert_close(RewardModel(merged, "sdpa", vector=True)(batch), adapted, atol=5e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ one 2-rank ZeRO-3 run


def test_rating_stats_skip_missing_ratings():
    from bigrm.data.stream import rating_stats, ratings_of

    examples = [Example("p", ("a",), "s", lab) for lab in make_labels()[0]]
    stats = rating_stats(np.array(ratings_of(examples)).reshape(-1, 3))
    present = [3.0, 4.0, 1.0, 0.0, 2.0]  # helpfulness: every non-NaN rating, each completion once
    assert stats["mean"][0] == pytest.approx(np.mean(present)) and stats["std"][0] == pytest.approx(np.std(present))
    nothing = rating_stats(np.zeros((0, 2)))  # nothing rated: targets stay finite
    assert nothing == {"mean": [0.0, 0.0], "std": [1.0, 1.0]}


def test_ratings_survive_the_token_store_and_reach_the_segments(tmp_path):
    """Labels.attributes → (S, A) store arrays on disk (memory-mapped back, NaN kept) → SegmentLabels.seg_attributes."""
    from bigrm.data.sequences import Tokenized
    from bigrm.data.token_store import TokenStore, concat

    labels, ks = make_labels()
    examples = [
        Example("p", tuple(f" c{i}" for i in range(k)), f"f:line {g}", lab)
        for g, (lab, k) in enumerate(zip(labels, ks, strict=True))
    ]
    lengths = np.full(sum(ks), 3, dtype=np.int64)
    done = Tokenized(np.arange(3 * sum(ks), dtype=np.uint32), lengths, lengths - 1, np.arange(len(examples)), None, [])
    TokenStore.of(done, examples, len(NAMES)).save(tmp_path / "store")
    nothing = np.zeros(0, np.int64)
    empty = Tokenized(np.zeros(0, np.uint32), nothing, nothing, nothing, None, [])
    store = concat([TokenStore.load(tmp_path / "store"), TokenStore.of(empty, [], len(NAMES))])
    for group, lab in zip(store, labels, strict=True):
        np.testing.assert_array_equal(np.array(group.labels.attributes), np.array(lab.attributes, dtype=np.float64))
    seg = collate(list(store), pad_id=0).labels.seg_attributes
    np.testing.assert_array_equal(seg.numpy(), np.array([r for lab in labels for r in lab.attributes], np.float32))
    plain = TokenStore.of(done, [Example("p", e.completions, e.source) for e in examples])
    assert plain.a["attributes"].shape == (sum(ks), 0) and plain[0].labels.attributes is None
    mixed = SegmentLabels.of([labels[0], Labels((0, 1))], [1, 2]).seg_attributes  # unrated prompts: NaN rows
    assert mixed.shape == (3, 3) and torch.isnan(mixed[1:]).all() and mixed[0, 0] == 3.0
