"""The ensemble kind (loss.ensemble): chosen by its option and refused where it cannot train, its members' forward,
and its export (members as plain 1-logit classifiers) scored as the trained model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

from bigrm import kinds, options
from bigrm.artifacts import export, merge
from bigrm.config import LoraConfig, QuantizationConfig
from bigrm.data.packing import collate
from bigrm.data.pipeline import Dataset
from bigrm.errors import ConfigError, DataError
from bigrm.inference.scoring import load_model
from bigrm.kinds import Ensemble, Scalar
from bigrm.model import adapters
from bigrm.model.ensemble import AdapterEnsemble, MemberEnsemble
from bigrm.model.reward_model import RewardModel, load_classifier
from tests.helpers.groups import random_groups

LORA = LoraConfig(r=4, alpha=8)


def data(stepwise: bool = False) -> Dataset:
    return Dataset([], [], [], [], stepwise=stepwise)


def test_loss_ensemble_chooses_the_kind_and_refuses_what_it_cannot_train():
    cfg = options.build({"loss.ensemble": 3, "lora.r": 8, "loss.ensemble_reward": "conservative"})
    kind = kinds.for_run(cfg.data, cfg.loss, data())
    assert type(kind) is Ensemble and kind.outputs == kinds.outputs_for(cfg.data, cfg.loss) == 3
    assert kind.adapters == ("member_0", "member_1", "member_2") and kind.reward == "conservative"
    assert Scalar().adapters == (adapters.ADAPTER,)
    with pytest.raises(ConfigError, match="loss.ensemble: members are LoRA adapter sets"):
        options.build({"loss.ensemble": 2})
    with pytest.raises(ConfigError, match="loss.ensemble: members, 0 .none. or at least 2, got 1"):
        options.build({"loss.ensemble": 1, "lora.r": 8})
    with pytest.raises(ConfigError, match="loss.ensemble: trains on ranked rows"):
        kinds.for_run(cfg.data, cfg.loss, data(stepwise=True))
    both = options.build({"loss.ensemble": 2, "lora.r": 8, "loss.length_head": True})
    with pytest.raises(ConfigError, match="loss.ensemble: trains on ranked rows"):
        kinds.for_run(both.data, both.loss, data())
    config = LlamaConfig(num_labels=3)
    kind.record(config)
    back = kinds.for_model(LlamaConfig.from_dict(config.to_dict()))
    assert type(back) is Ensemble and vars(back) == vars(kind)
    with pytest.raises(DataError, match="not stepwise rows"):
        kinds.for_model(config, stepwise_rows=True)


def test_the_reward_is_the_recorded_aggregation_and_scoring_returns_every_one():
    values = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=torch.float64)
    assert Ensemble(2).rewards(values).tolist() == [2.0, 2.0]
    assert Ensemble(2, reward="min").rewards(values).tolist() == [1.0, 2.0]
    assert Ensemble(2, reward="conservative", lam=0.5).rewards(values).tolist() == [1.5, 2.0]
    fields = Ensemble(2, lam=2.0).score_fields(values.tolist(), None)["ensemble"]
    assert fields["mean"] == [2.0, 2.0] and fields["std"] == [1.0, 0.0] and fields["conservative"] == [0.0, 2.0]
    assert fields["min"] == [1.0, 2.0] and fields["members"] == values.tolist() and fields["reward"] == "mean"


def adapted(llama_dir, members: int):
    """A tiny Llama with `members` adapter sets whose B matrices are random (a no-op adapter proves nothing)."""
    tok = AutoTokenizer.from_pretrained(llama_dir)
    torch.manual_seed(0)
    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok, num_labels=members)
    adapters.add_lora(classifier, LORA, Ensemble(members).adapters)
    with torch.no_grad():
        for name, p in classifier.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    return classifier.eval(), tok  # peft's new dropout layers start in training mode


def test_each_member_runs_its_own_adapters_and_head_row_and_every_member_trains(llama_dir):
    classifier, tok = adapted(llama_dir, 3)
    assert all(p.requires_grad for n, p in classifier.named_parameters() if ".lora_" in n)
    model = Ensemble(3).reward_model(classifier, "sdpa")
    assert type(model) is AdapterEnsemble
    batch = collate(random_groups(1, 200, n_groups=2), tok.pad_token_id)
    values = model(batch)
    trained = {n: p for n, p in classifier.named_parameters() if p.requires_grad}
    state = {n.removeprefix("base_model.model."): p.detach() for n, p in trained.items()}
    for m, member in enumerate(Ensemble(3).member_states(state)):
        alone = load_classifier(str(llama_dir), torch.float32, "sdpa", tok, fresh_head=True)
        adapters.add_lora(alone, LORA)
        adapters.load_trained(alone, member, "member")
        torch.testing.assert_close(RewardModel(alone.eval(), "sdpa")(batch), values[:, m], atol=1e-6, rtol=0)
    values.sum().backward()
    for m in range(3):
        grads = [p.grad for n, p in trained.items() if f".lora_A.member_{m}." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_export_is_one_plain_classifier_per_member_and_scores_as_trained(tmp_path, llama_dir):
    classifier, tok = adapted(llama_dir, 2)
    kind = Ensemble(2, reward="conservative")
    kind.record(classifier.config)
    groups = random_groups(1, 200, n_groups=3)
    seqs = [s.tolist() for g in groups for s in g.seqs]
    with torch.no_grad():
        expected = kind.reward_model(classifier, "sdpa").eval()(collate(groups, tok.pad_token_id))
    state = {
        n.removeprefix("base_model.model."): p.detach() for n, p in classifier.named_parameters() if p.requires_grad
    }
    settings = adapters.Settings(str(llama_dir), LORA, QuantizationConfig())
    members = export.exported_classifiers(settings, state, torch.float32, tok, kind)
    dest = tmp_path / "final"

    def write(tmp):
        export.save_export(
            members, None, tok, tmp, {"reward_mean": 0.5, "reward_std": 2.0}, "trl", kind, classifier.config
        )

    def verified(tmp):
        return export.check(expected, kind.plain_rewards(tmp, seqs, "cpu"), 1e-5, dest)

    assert export.write_verified(dest, write, verified) is None
    top = json.loads((dest / "config.json").read_text())
    assert top["bigrm_ensemble"]["reward"] == "conservative" and top["bigrm_reward_mean"] == 0.5
    for m in range(2):  # what a plain transformers user loads: each member, one logit
        plain = AutoModelForSequenceClassification.from_pretrained(dest / f"member_{m}").eval()
        assert plain.config.num_labels == 1 and type(kinds.for_model(plain.config)) is Scalar
        with torch.no_grad():
            got = torch.stack([plain(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
        torch.testing.assert_close(got, expected[:, m], atol=1e-5, rtol=0)
    model, _, convention, loaded = load_model(str(dest), torch.device("cpu"))
    assert type(model) is MemberEnsemble and type(loaded) is Ensemble and convention == "trl"
    with torch.no_grad():
        scored = model(collate(groups, tok.pad_token_id))
    torch.testing.assert_close(scored, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.rewards(scored), kind.rewards(expected), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="is an ensemble of 2: merge its member_. exports"):
        merge.merge([dest, dest], tmp_path / "merged")
    merge.merge([dest / "member_0", dest / "member_1"], tmp_path / "soup")  # members are plain exports: a soup
