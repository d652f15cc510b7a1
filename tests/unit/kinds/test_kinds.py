"""Which kind a run or a model is, what each kind records and reads back, and that a new kind plugs in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from bigrm import kinds, options
from bigrm.config import LossConfig
from bigrm.data.labels import Labels
from bigrm.data.packing import collate
from bigrm.data.pipeline import Dataset
from bigrm.data.sequences import Group
from bigrm.errors import ExportError
from bigrm.kinds import Attributes, Scalar, Steps
from bigrm.kinds.steps import SEPARATOR_KEY
from bigrm.model.heads import AttributeHead
from bigrm.training.evaluate import evaluate_rewards
from bigrm.training.meter import Meter

HEAD = AttributeHead(("a", "b"), (1.0, -0.5), (1.0, 2.0), (2.0, 0.5))


def data(stepwise: bool = False, stats: dict | None = None) -> Dataset:
    return Dataset([], [], [], [], attribute_stats=stats, stepwise=stepwise)


def test_the_run_options_and_data_choose_the_kind():
    plain = options.build({})
    assert type(kinds.for_run(plain.data, plain.loss, data())) is Scalar
    assert kinds.outputs_for(plain.data, plain.loss) == 1
    separated = options.build({"data.step_separator": " ;"})
    steps = kinds.for_run(separated.data, separated.loss, data(stepwise=True))
    assert type(steps) is Steps and steps.separator == " ;" and steps.outputs == 1
    rated = options.build({"data.attributes": ["a", "b"], "loss.attribute_weights": [1.0, -0.5]})
    kind = kinds.for_run(rated.data, rated.loss, data(stats={"mean": [1.0, 2.0], "std": [2.0, 0.5]}))
    assert type(kind) is Attributes and kind.head == HEAD
    assert kind.outputs == kinds.outputs_for(rated.data, rated.loss) == 2
    assert kind.vector and not steps.vector


@pytest.mark.parametrize("kind", [Scalar(), Steps("\n\n", "joined", "<step>"), Attributes(HEAD)], ids=lambda k: k.name)
def test_what_a_kind_records_reads_back_as_that_kind(kind):
    config = LlamaConfig(num_labels=kind.outputs)
    kind.record(config)
    back = kinds.for_model(LlamaConfig.from_dict(config.to_dict()))
    assert type(back) is type(kind) and vars(back) == vars(kind)


def test_a_process_reward_model_scores_rows_laid_out_as_it_was_trained():
    run = options.build({"data.step_layout": "joined", "data.step_token": "<extra_0>"})
    config = LlamaConfig()
    kinds.for_run(run.data, run.loss, data(stepwise=True)).record(config)
    back = kinds.for_model(LlamaConfig.from_dict(config.to_dict()))
    want = {"data.step_separator": "\n", "data.step_layout": "joined", "data.step_token": "<extra_0>"}
    assert back.data_defaults() == want
    config = LlamaConfig()
    setattr(config, SEPARATOR_KEY, "\n")  # exported before layouts were recorded: the joined text's tokens
    assert kinds.for_model(config).data_defaults()["data.step_layout"] == "joined"
    assert Steps().data_defaults() == {} and options.build({}).data.step_layout == "trl"


def test_stepwise_rows_are_scored_as_a_process_reward_model_by_any_one_output_model():
    assert type(kinds.for_model(LlamaConfig(), stepwise_rows=True)) is Steps
    config = LlamaConfig()
    Attributes(HEAD).record(config)
    assert type(kinds.for_model(config, stepwise_rows=True)) is Attributes


def test_score_fields_and_data_defaults():
    assert Scalar().score_fields([0.5], None) == {} and Scalar().data_defaults() == {}
    assert Steps().score_fields([1.0], [[0.0, 2.0]]) == {"step_rewards": [[0.5, pytest.approx(0.8807970779778823)]]}
    fields = Attributes(HEAD).score_fields([[1.0, -2.0]], None)
    assert fields == {"attributes": {"a": [3.0], "b": [1.0]}}  # raw scale: mean + std * v
    assert Attributes(HEAD).data_defaults() == {"data.attributes": ["a", "b"]}


def test_only_an_attribute_head_merges():
    with pytest.raises(ExportError, match="scalar head"):
        Scalar().merge(torch.nn.Linear(2, 1))


class Doubled(Scalar):
    """A kind written as a test would add one: a reward twice the head's output, plus an L1 term it logs."""

    name = "doubled"

    @classmethod
    def for_run(cls, data, loss, dataset):
        return cls() if data.prompt_column == "question" else None

    def rewards(self, values):
        return 2 * values

    def loss(self, values, labels, cfg, norm):
        loss, stats, _ = super().loss(self.rewards(values), labels, cfg, norm)
        l1 = values.abs().sum().double().reshape(1)
        return loss + l1[0], stats, l1

    def new_sums(self, device):
        return torch.zeros(1, dtype=torch.float64, device=device)

    def train_metrics(self, sums):
        return {"l1": float(sums[0])}

    def loss_terms(self, sums, cfg):
        return {} if sums is None else {"l1_loss": (float(sums[0]), 1.0)}

    def eval_part(self, values, labels):
        return values.detach().cpu()

    def eval_metrics(self, parts):
        return {"max_abs": float(torch.cat(parts).abs().max())}


def test_a_new_kind_is_one_class_and_its_registration(monkeypatch):
    monkeypatch.setattr(kinds, "KINDS", (Doubled, *kinds.KINDS))
    cfg = options.build({"data.prompt_column": "question"})
    kind = kinds.for_run(cfg.data, cfg.loss, data())
    assert type(kind) is Doubled
    groups = [Group((np.array([1, 2]), np.array([3])), "g0", Labels()), Group((np.array([4]),) * 2, "g1", Labels())]
    values = {1: torch.tensor([0.5, -1.0]), 2: torch.tensor([0.25, 0.25])}

    def model(batch):  # a fixed value per group, found from its first token
        return torch.cat([values[1] if int(batch.input_ids[0, 0]) == 1 else values[2]])

    cfg = LossConfig()
    metrics, rewards = evaluate_rewards(
        model, groups[:1], budget=64, window=8, pad_id=0, device=torch.device("cpu"), cfg=cfg, kind=kind
    )
    assert rewards.tolist() == [1.0, -2.0] and metrics["max_abs"] == 1.0
    assert metrics["loss"] == pytest.approx(np.log1p(np.exp(-3.0)) + 1.5) and metrics["l1_loss"] == 1.5  # eval too
    assert metrics["pairwise_accuracy"] == 1.0  # 2 * 0.5 > 2 * -1.0
    batch = collate(groups[:1], 0)
    loss, stats, sums = kind.loss(values[1], batch.labels, cfg, kind.share(groups[0], cfg))
    assert loss.item() == pytest.approx(np.log1p(np.exp(-3.0)) + 1.5) and sums.tolist() == [1.5]
    meter = Meter(torch.device("cpu"), 64, None, kind)  # the log window sums what the kind's loss returns
    meter.add(stats, batch, 0.0, sums)
    meter.add(stats, batch, 0.0, sums)
    logged = meter.read(cfg, 1e-5)
    assert logged["l1"] == 3.0 and logged["l1_loss"] == 3.0  # its term is logged alone and in the loss
    assert logged["loss"] == pytest.approx(np.log1p(np.exp(-3.0)) + 3.0) == logged["ranking_loss"] + 3.0
