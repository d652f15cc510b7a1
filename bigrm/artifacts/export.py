"""Trained weights → a plain Hugging Face sequence classifier directory (safetensors, config, tokenizer).

Every export verifies itself: a few held-out scored sequences are rewarded by the training-time model (the packed
forward) and by the written directory re-loaded with plain transformers, one sequence at a time; a difference
beyond tolerance raises ExportError.

A model trained on stepwise rows (a process reward model: its config records SEPARATOR_KEY) is exported as the
2-label token classifier that PRM users load, `AutoModelForTokenClassification` / `pipeline("token-classification")`
as TRL documents for its PRMTrainer models: its head's rows are (0, w) and biases (0, b), so the logits at a token
are (0, v) and softmax(...)[1] = σ(v), the probability that the step ending there is correct (label 1 = correct,
as TRL's labels), while v = logits[1] - logits[0] is the value bigrm trained, at step ends and at the final token.
Its self-check also compares the values at the verification sequences' step ends.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigrm import dist, progress
from bigrm.artifacts import checkpoint
from bigrm.data.packing import collate
from bigrm.data.sequences import Group
from bigrm.errors import ExportError
from bigrm.model import adapters
from bigrm.model.attention import attention_needs, hf_attn_implementation, read_attention_needs, resolve_attn
from bigrm.model.heads import CONFIG_KEY, AttributeHead, merged_head, read_head, record_head
from bigrm.model.reward_model import RewardModel, load_classifier

PREFIX = "classifier."
# config.json key of the reward convention (bigrm.data.sequences) the model was trained with: scoring reads it back
CONVENTION_KEY = "bigrm_reward_convention"
# config.json key of a merged attribute export: the AttributeHead (names, weights, scale) its one logit combines
MERGED_KEY = "bigrm_merged_attributes"
# config.json key of data.step_separator, set when the model was trained on stepwise rows: the export is a PRM
SEPARATOR_KEY = "bigrm_step_separator"
EXPORT_STAGES = ("consolidate shards", "write", "verify")  # what the export's progress counts
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def save_classifier(
    classifier,
    state: dict[str, torch.Tensor],
    tokenizer,
    dest: Path,
    reward_stats: dict | None = None,
    convention: str | None = None,
    separator: str | None = None,
) -> None:
    """Loads back with AutoModelForSequenceClassification.from_pretrained(dest). `reward_stats` (mean and std of
    the rewards over the final training epoch) go into config.json as `bigrm_reward_mean` / `bigrm_reward_std`,
    and as `mean` / `std`, the names OpenRLHF's `--normalize_reward` reads; `convention` as CONVENTION_KEY. With a
    `separator` (a process reward model's data.step_separator, as SEPARATOR_KEY) it is written as a token classifier
    (AutoModelForTokenClassification)."""
    dest.mkdir(parents=True, exist_ok=True)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    for key, value in (reward_stats or {}).items():
        setattr(classifier.config, f"bigrm_{key}", value)
    if reward_stats:
        classifier.config.mean, classifier.config.std = reward_stats["reward_mean"], reward_stats["reward_std"]
    if convention:
        setattr(classifier.config, CONVENTION_KEY, convention)
    if separator is not None:
        setattr(classifier.config, SEPARATOR_KEY, separator)
        classifier, state = token_classifier(classifier.config, state)
    classifier.save_pretrained(dest, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def _token_head(model: nn.Module) -> str:
    """The name of a token classifier's output Linear (`score` for most decoders, `classifier` for some)."""
    names = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
    if len(names) != 1:
        raise ExportError(f"{type(model).__name__}: expected one output Linear beside the backbone, found {names}")
    return names[0]


def token_classifier(config, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(2-label *ForTokenClassification, its state) whose logits are (0, v) where the 1-label classifier's are v."""
    from transformers import AutoModelForTokenClassification

    config = copy.deepcopy(config)
    config.num_labels = 2
    config.id2label, config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    config.architectures = None
    with torch.device("meta"):  # only its class and config are written: the weights are `state`
        model = AutoModelForTokenClassification.from_config(config)
    model.config.architectures = [type(model).__name__]
    head = _token_head(model)
    w = state["score.weight"]  # (1, H)
    bias = state.get("score.bias", torch.zeros(1, dtype=w.dtype))
    out = {k: v for k, v in state.items() if not k.startswith("score.")}
    out[f"{head}.weight"] = torch.cat([torch.zeros_like(w), w])
    if getattr(model, head).bias is not None:
        out[f"{head}.bias"] = torch.cat([torch.zeros_like(bias), bias])
    elif bias.abs().max() > 0:
        raise ExportError(f"{type(model).__name__} has no head bias to carry the value head's bias")
    return model, out


def value_classifier(path: str, dtype, attn: str) -> nn.Module:
    """A token-classifier export loaded back as the 1-label classifier bigrm trains and scores with (v = logit 1 -
    logit 0 at every token)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    tokens = AutoModelForTokenClassification.from_pretrained(path, dtype=dtype)
    head = getattr(tokens, _token_head(tokens))
    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.architectures = None
    config._attn_implementation = hf_attn_implementation(attn)
    model = AutoModelForSequenceClassification.from_config(config, dtype=tokens.dtype)
    state = {k: v for k, v in tokens.state_dict().items() if k.startswith(tokens.base_model_prefix + ".")}
    state["score.weight"] = (head.weight[1] - head.weight[0])[None]
    if model.score.bias is not None:
        b = head.bias if head.bias is not None else torch.zeros(2, dtype=tokens.dtype)
        state["score.bias"] = (b[1] - b[0])[None]
    model.load_state_dict(state, strict=True)
    return model.eval()


def is_token_export(path: Path) -> bool:
    import json

    config = path / "config.json"
    return config.is_file() and SEPARATOR_KEY in json.loads(config.read_text())


def plain_rewards(dest: Path, seqs: list[list[int]], device: torch.device, steps: list | None = None) -> torch.Tensor:
    """(S,) rewards ((S, A) logits of an A-output head) from the exported directory, each sequence forwarded alone
    as any transformers user would; for a token-classifier export (S + P,): the value logits[1] - logits[0] at each
    final token, then at each step end (`steps`: per sequence its step-end indices)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    if not is_token_export(dest):
        model = AutoModelForSequenceClassification.from_pretrained(dest).to(device).eval()
        with torch.no_grad():
            out = [model(input_ids=torch.tensor([s], device=device)).logits[0].float() for s in seqs]
        if not out:
            return torch.zeros(0)
        logits = torch.stack(out).cpu()  # (S, num_labels)
        return logits if model.config.num_labels > 1 else logits[:, 0]
    model = AutoModelForTokenClassification.from_pretrained(dest).to(device).eval()
    last, at_steps = [], []
    with torch.no_grad():
        for s, ends in zip(seqs, steps or [[]] * len(seqs), strict=True):
            logits = model(input_ids=torch.tensor([s], device=device)).logits[0].float()  # (T, 2)
            v = (logits[:, 1] - logits[:, 0]).cpu()
            last.append(v[-1])
            at_steps.append(v[list(ends)])
    return torch.cat([torch.stack(last), *at_steps]) if last else torch.zeros(0)


def tolerance(dtype: torch.dtype, quant_bits: int = 0) -> float:
    # LLM.int8 also quantises activations in the adapted forward; the merged export computes them unquantised
    return TOLERANCE[torch.bfloat16] if quant_bits == 8 else TOLERANCE[dtype]


def check(expected: torch.Tensor, got: torch.Tensor, tol: float, dest: Path) -> str | None:
    """A message when the export's rewards differ from the training-time model's beyond tolerance."""
    worst = (expected - got.reshape(expected.shape)).abs().max().item() if len(got) else 0.0
    if worst > tol * max(1.0, expected.abs().max().item() if len(got) else 1.0):
        return (
            f"export {dest} does not reproduce the trained model: max reward difference {worst:.3g} over "
            f"{len(got)} held-out sequences (tolerance {tol})"
        )
    return None


def adapted_classifier(
    settings: adapters.Settings, state: dict[str, torch.Tensor], dtype: torch.dtype, tokenizer, merged: bool
) -> nn.Module:
    """A LoRA run's classifier, from its base directory and its trained weights: as trained (adapters beside the
    base, quantised if it was) or merged (adapters added into the de-quantised base: a plain classifier)."""
    attn = resolve_attn("auto", cuda=False, needs=read_attention_needs(settings.base))
    outputs = state["score.weight"].shape[0]  # the trained head's: attribute heads have one row per attribute
    classifier = load_classifier(settings.base, dtype, attn, tokenizer, quant=settings.quantization, num_labels=outputs)
    if merged and settings.quantization.bits:
        classifier = classifier.dequantize()
    wrapped = adapters.add_lora(classifier, settings.lora)
    adapters.load_trained(classifier, state, f"the trained weights for {settings.base}")
    return (adapters.merge(wrapped, dtype) if merged else classifier).eval()


def verification_groups(held_out: list[Group], window: int | None, n: int = 4) -> list[Group]:
    """The groups every export checks itself on: the first `n` held-out ones, plus, when none of those has a sequence
    longer than the model's smallest attention window, the first held-out group that has one (a packed forward that
    ignored the window would agree with plain transformers on shorter sequences)."""
    chosen = held_out[:n]

    def long(g: Group) -> bool:
        return any(len(s) > window for s in g.seqs)

    if window is None or any(long(g) for g in chosen):
        return chosen
    longer = next((g for g in held_out[n:] if long(g)), None)
    return chosen + [longer] if longer else chosen


def _verify_batch(groups: list[Group], pad_id: int, device: torch.device):
    """(packed batch, per sequence its token ids, per sequence its step ends)."""
    steps = [[int(i) for i in e] for g in groups for e in (g.steps or [[]] * len(g.seqs))]
    return collate(groups, pad_id).to(device), [s.tolist() for g in groups for s in g.seqs], steps


def export_engine(
    engine,
    tokenizer,
    dest: Path,
    verify: list[Group],
    device: torch.device,
    dtype: torch.dtype,
    settings: adapters.Settings | None = None,
    reward_stats: dict | None = None,
) -> None:
    """Collective, at the end of training: gather ZeRO-3 shards (only the trained ones with LoRA), write on rank 0
    (LoRA merged into the base), verify, agree on the verdict."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    batch, seqs, steps = _verify_batch(verify, tokenizer.pad_token_id, device)
    engine.eval()
    with torch.no_grad():
        expected = engine(batch).float().cpu()  # collective under ZeRO-3: every rank runs it
    lora = settings is not None
    stages = progress.Stages("export", EXPORT_STAGES)
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)
    else:
        state = engine.module_state_dict(exclude_frozen_parameters=lora)
    stages.advance()
    problem = None
    if dist.is_main():
        # plain loads must not see the ZeRO-3 config, or from_pretrained would start collectives on rank 0 alone
        unset_hf_deepspeed_config()
        state = {k.removeprefix(PREFIX): v.cpu() for k, v in state.items()}
        if lora:
            classifier = adapted_classifier(settings, state, dtype, tokenizer, merged=True)
            head = read_head(engine.module.classifier.config)
            if head:
                record_head(classifier.config, head)
            state = classifier.state_dict()
        else:
            classifier = engine.module.classifier
        trained = engine.module.classifier.config  # a LoRA classifier is rebuilt from a base that lacks these
        convention, separator = (getattr(trained, key, None) for key in (CONVENTION_KEY, SEPARATOR_KEY))
        with progress.transformers_bars():
            save_classifier(classifier, state, tokenizer, dest, reward_stats, convention, separator)
            stages.advance()
            quant_bits = settings.quantization.bits if lora else 0
            problem = check(expected, plain_rewards(dest, seqs, device, steps), tolerance(dtype, quant_bits), dest)
        stages.advance()
    failed = dist.all_sum(torch.tensor([float(problem is not None)], device=device)).item()
    if failed:
        raise ExportError(problem or "export verification failed on rank 0")


@dataclasses.dataclass
class _Checkpoint:
    state: dict[str, torch.Tensor]
    config: object
    tokenizer: object
    dtype: torch.dtype
    settings: adapters.Settings | None  # None: a fully trained model

    def classifier(self, merged: bool = False) -> nn.Module:
        """The model as trained, or with `merged` (LoRA only differs) the plain classifier it exports to."""
        if self.settings:
            classifier = adapted_classifier(self.settings, self.state, self.dtype, self.tokenizer, merged)
            head = read_head(self.config)
            if head:
                record_head(classifier.config, head)
            return classifier
        from transformers import AutoModelForSequenceClassification

        classifier = AutoModelForSequenceClassification.from_config(self.config)
        classifier.load_state_dict(self.state, strict=True)
        return classifier.to(self.dtype).eval()


def _read_checkpoint(path: Path, dtype: torch.dtype | None) -> _Checkpoint:
    from transformers import AutoConfig, AutoTokenizer

    state = {k.removeprefix(PREFIX): v for k, v in checkpoint.consolidated_state_dict(path).items()}
    config = AutoConfig.from_pretrained(path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(path / "hf")
    return _Checkpoint(
        state, config, tokenizer, dtype or config.dtype or torch.float32, adapters.Settings.read(path / "hf")
    )


def classifier_from_checkpoint(path: Path, dtype: torch.dtype | None = None):
    """(HF classifier with the checkpoint's weights, tokenizer, recorded reward convention or None) built on one
    process from a bigrm checkpoint; for a LoRA checkpoint, the adapted model as trained."""
    saved = _read_checkpoint(path, dtype)
    return saved.classifier(), saved.tokenizer, getattr(saved.config, CONVENTION_KEY, None)


def merge_attributes(classifier: nn.Module) -> AttributeHead:
    """Turn an attribute classifier (A outputs) into the plain 1-output one whose logit is the scalar Σ_a w_a v_a, in
    place; returns the head it merged (recorded under MERGED_KEY)."""
    head = read_head(classifier.config)
    if head is None:
        raise ExportError("--merge-attributes: the model has a scalar head, not attribute heads (data.attributes)")
    old = classifier.score
    weight, bias = merged_head(old.weight.data, None if old.bias is None else old.bias.data, head)
    classifier.score = nn.Linear(old.in_features, 1, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        classifier.score.weight.copy_(weight)
        if bias is not None:
            classifier.score.bias.copy_(bias)
    config = classifier.config
    delattr(config, CONFIG_KEY)
    config.id2label, config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}  # what num_labels=1 loads as
    config.num_labels, config.problem_type = 1, "regression"
    setattr(config, MERGED_KEY, head.to_dict())
    return head


def export_checkpoint(path: Path, dest: Path, dtype: torch.dtype | None = None, merge: bool = False) -> torch.Tensor:
    """`bigrm export`: checkpoint → verified HF directory. Returns the verification rewards. With `merge`, an
    attribute model is written as its 1-logit scalar model (merge_attributes), verified against the scalar."""
    stages = progress.Stages("export", EXPORT_STAGES)
    saved = _read_checkpoint(path, dtype)
    stages.advance()
    tokenizer = saved.tokenizer
    ids = torch.load(path / "verify.pt", weights_only=False)  # per group, K lists of token ids
    verify = [Group(tuple(np.asarray(s, dtype=np.int64) for s in seqs), "verify") for seqs in ids]
    batch, seqs, _ = _verify_batch(verify, tokenizer.pad_token_id, torch.device("cpu"))
    trained = saved.classifier()
    attn = resolve_attn("auto", cuda=False, needs=attention_needs(trained.config))  # eager for soft-capped models
    trained.config._attn_implementation = hf_attn_implementation(attn)
    with torch.no_grad():
        model = RewardModel(trained, attn)
        expected = model(batch).float()
    if merge and model.attributes:
        expected = model.attributes.scalar(expected)
    classifier = saved.classifier(merged=True) if saved.settings else trained  # LoRA: rebuilt, then merged
    if merge:
        merge_attributes(classifier)
    convention, separator = (getattr(saved.config, key, None) for key in (CONVENTION_KEY, SEPARATOR_KEY))
    with progress.transformers_bars():
        save_classifier(
            classifier, classifier.state_dict(), tokenizer, dest, convention=convention, separator=separator
        )
        stages.advance()
        quant_bits = saved.settings.quantization.bits if saved.settings else 0
        got = plain_rewards(dest, seqs, torch.device("cpu"))
    problem = check(expected, got, tolerance(classifier.dtype, quant_bits), dest)
    stages.advance()
    if problem:
        raise ExportError(problem)
    return expected
