"""Trained weights → a plain Hugging Face sequence classifier directory (safetensors, config, tokenizer).

Every export verifies itself: a few held-out scored sequences are rewarded by the training-time model (the packed
forward) and by the written directory re-loaded with plain transformers, one sequence at a time; a difference
beyond tolerance raises ExportError. It is written into a temporary directory beside its destination and renamed
into place only once verified, with VERIFIED (its files' sizes and hashes) written last: a destination holds a
whole verified export or none, and scoring refuses a bigrm export without VERIFIED or whose files differ from it.

What is written and how it is read back depends on the model's reward kind (bigrm.kinds: a process reward model
is written as a token classifier, an attribute head with its meaning, or merged into one logit).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigrm import dist, progress
from bigrm.artifacts import checkpoint
from bigrm.data.packing import collate
from bigrm.data.sequences import Group
from bigrm.errors import ExportError, write_failure
from bigrm.hashing import differs, listing
from bigrm.kinds import RewardKind, Scalar, for_model
from bigrm.model import adapters
from bigrm.model.attention import attention_needs, hf_attn_implementation, read_attention_needs, resolve_attn
from bigrm.model.ensemble import MEMBER
from bigrm.model.reward_model import load_classifier

PREFIX = "classifier."
# config.json key of the reward convention (bigrm.data.sequences) the model was trained with: scoring reads it back
CONVENTION_KEY = "bigrm_reward_convention"
EXPORT_STAGES = ("consolidate shards", "write", "verify")  # what the export's progress counts
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
VERIFIED = "bigrm_export.json"  # written last, once the export reproduces the trained model: what scoring trusts


def save_classifier(
    classifier,
    state: dict[str, torch.Tensor],
    tokenizer,
    dest: Path,
    reward_stats: dict | None = None,
    convention: str | None = None,
    kind: RewardKind | None = None,
) -> None:
    """Writes the reward kind's export form (kind.export_form; default: scalar, a plain sequence classifier that
    loads back with AutoModelForSequenceClassification.from_pretrained(dest)) with what the kind records.
    `reward_stats` (mean and std of the rewards over the final training epoch) go into config.json as
    `bigrm_reward_mean` / `bigrm_reward_std`, and as `mean` / `std`, the names OpenRLHF's `--normalize_reward` reads;
    `convention` as CONVENTION_KEY."""
    dest.mkdir(parents=True, exist_ok=True)
    _record(classifier.config, tokenizer, reward_stats, convention)
    kind = kind or Scalar()
    kind.record(classifier.config)
    classifier, state = kind.export_form(classifier, state)
    classifier.save_pretrained(dest, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def _record(config, tokenizer, reward_stats: dict | None, convention: str | None) -> None:
    config.pad_token_id = tokenizer.pad_token_id
    for key, value in (reward_stats or {}).items():
        setattr(config, f"bigrm_{key}", value)
    if reward_stats:
        config.mean, config.std = reward_stats["reward_mean"], reward_stats["reward_std"]
    if convention:
        setattr(config, CONVENTION_KEY, convention)


def save_export(members: list[nn.Module], state, tokenizer, dest: Path, reward_stats, convention, kind, config) -> None:
    """One classifier as save_classifier writes it (`state` its weights); an ensemble's members (bigrm.kinds.ensemble)
    each as a plain 1-logit classifier in its own sealed directory dest/member_m, and beside them the ensemble's
    transformers `config` (what the kind records, the reward statistics) and tokenizer."""
    if len(members) == 1:
        save_classifier(members[0], state, tokenizer, dest, reward_stats, convention, kind)
        return
    for m, classifier in enumerate(members):
        save_classifier(classifier, classifier.state_dict(), tokenizer, dest / MEMBER.format(m), None, convention)
        seal(dest / MEMBER.format(m))
    config = copy.deepcopy(config)
    _record(config, tokenizer, reward_stats, convention)
    kind.record(config)
    config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def check_destination(dest: Path, flag: str) -> None:
    """Before any work: `dest` (option `flag`) can take an export: absent, empty or an earlier export (replaced), in a
    directory that can be written."""
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{flag}: {dest} exists and is not a directory: give a directory to export to")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / VERIFIED).is_file():
        raise ExportError(f"{flag}: {dest} holds files that are not a bigrm export: give a new or empty directory")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"{flag}: cannot create {dest.parent} ({err.strerror})") from None
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise ExportError(f"{flag}: cannot write in {dest.parent}")


def seal(directory: Path) -> None:
    """Mark a written export verified: VERIFIED lists its files as they are now."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    (directory / VERIFIED).write_text(json.dumps({"files": listing(directory, files)}, indent=2) + "\n")


def write_verified(dest: Path, write: Callable[[Path], None], problem: Callable[[Path], str | None]) -> str | None:
    """`write(tmp)` the export into a directory beside `dest`, `problem(tmp)` its verification (None: verified); a
    verified one is sealed and renamed into place, replacing an earlier export. Returns the problem, leaving `dest`
    untouched. A write that fails (a full disk) raises ExportError; no temporary directory is left either way."""
    check_destination(dest, "export")
    tmp, old = (dest.parent / f".{dest.name}.{what}-{os.getpid()}" for what in ("tmp", "old"))
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        found = problem(tmp)
        if found is None:
            seal(tmp)
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
        return found
    except Exception as err:
        failure = write_failure(err)
        if failure is None:
            raise
        raise ExportError(f"cannot write the export {dest}: {failure}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_export(path: Path) -> None:
    """Before scoring a model directory: a Hugging Face one; a bigrm export (config.json records bigrm keys) only
    once verified (VERIFIED), its files as they were written."""
    config = path / "config.json"
    if not config.is_file():
        raise ExportError(f"{path}: no config.json: neither an exported model nor a complete bigrm checkpoint")
    try:
        recorded = json.loads(config.read_text())
    except ValueError as err:
        raise ExportError(f"{config}: not a JSON object ({err})") from None
    if not any(str(key).startswith("bigrm_") for key in recorded):
        return  # any Hugging Face classifier
    if not (path / VERIFIED).is_file():
        raise ExportError(
            f"{path}: a bigrm export without {VERIFIED}: its writing was cut short or it was never verified; "
            "export it again (bigrm export --checkpoint ...)"
        )
    problem = differs(path, json.loads((path / VERIFIED).read_text())["files"])
    if problem:
        raise ExportError(f"{path}: {problem}: export it again (bigrm export --checkpoint ...)")


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
    classifier = load_classifier(
        settings.base, dtype, attn, tokenizer, quant=settings.quantization, num_labels=outputs, fresh_head=True
    )
    if merged and settings.quantization.bits:
        classifier = classifier.dequantize()
    wrapped = adapters.add_lora(classifier, settings.lora, adapters.adapter_names(state))
    adapters.load_trained(classifier, state, f"the trained weights for {settings.base}")
    return (adapters.merge(wrapped, dtype) if merged else classifier).eval()


def exported_classifiers(settings: adapters.Settings, state: dict, dtype: torch.dtype, tokenizer, kind: RewardKind):
    """The plain classifiers a LoRA run's weights are written as: one, or one per ensemble member."""
    return [adapted_classifier(settings, s, dtype, tokenizer, merged=True) for s in kind.member_states(state)]


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
        trained = engine.module.classifier.config  # a LoRA classifier is rebuilt from a base that lacks its records
        kind = for_model(trained)
        if lora:
            members = exported_classifiers(settings, state, dtype, tokenizer, kind)
            state = members[0].state_dict()
        else:
            members = [engine.module.classifier]
        convention = getattr(trained, CONVENTION_KEY, None)
        tol = tolerance(dtype, settings.quantization.bits if lora else 0)

        def write(tmp: Path) -> None:
            save_export(members, state, tokenizer, tmp, reward_stats, convention, kind, trained)
            stages.advance()

        def verified(tmp: Path) -> str | None:
            return check(kind.export_values(expected), kind.plain_rewards(tmp, seqs, device, steps), tol, dest)

        with progress.transformers_bars():
            try:
                problem = write_verified(dest, write, verified)
            except ExportError as err:  # the other ranks wait for the verdict: it must reach them
                problem = str(err)
        stages.advance()
    problems = [p for p in dist.gather_objects(problem) if p]  # every rank raises rank 0's words: one line
    if problems:
        raise ExportError(problems[0])


@dataclasses.dataclass
class _Checkpoint:
    state: dict[str, torch.Tensor]
    config: object
    tokenizer: object
    dtype: torch.dtype
    settings: adapters.Settings | None  # None: a fully trained model
    reward_stats: dict | None  # the rewards' mean and std over the epoch so far, as final/ records them

    def classifier(self) -> nn.Module:
        """The model as trained (LoRA: its adapters beside the base)."""
        if self.settings:
            classifier = adapted_classifier(self.settings, self.state, self.dtype, self.tokenizer, merged=False)
            for_model(self.config).record(classifier.config)  # the base's config lacks what the kind records
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
    settings, stats = adapters.Settings.read(path / "hf"), checkpoint.read_meta(path).get("reward_stats")
    return _Checkpoint(state, config, tokenizer, dtype or config.dtype or torch.float32, settings, stats)


def classifier_from_checkpoint(path: Path, dtype: torch.dtype | None = None):
    """(HF classifier with the checkpoint's weights, tokenizer, recorded reward convention or None) built on one
    process from a bigrm checkpoint; for a LoRA checkpoint, the adapted model as trained."""
    saved = _read_checkpoint(path, dtype)
    return saved.classifier(), saved.tokenizer, getattr(saved.config, CONVENTION_KEY, None)


def export_checkpoint(path: Path, dest: Path, dtype: torch.dtype | None = None, merge: bool = False) -> torch.Tensor:
    """`bigrm export`: checkpoint → verified HF directory. Returns the verification rewards. With `merge`, an
    attribute model is written as its 1-logit scalar model (the kind's `merge`), verified against the scalar."""
    check_destination(dest, "--out")
    stages = progress.Stages("export", EXPORT_STAGES)
    saved = _read_checkpoint(path, dtype)
    stages.advance()
    tokenizer, kind = saved.tokenizer, for_model(saved.config)
    ids = checkpoint.read_pt(path / "verify.pt")  # per group, K lists of token ids
    verify = [Group(tuple(np.asarray(s, dtype=np.int64) for s in seqs), "verify") for seqs in ids]
    batch, seqs, _ = _verify_batch(verify, tokenizer.pad_token_id, torch.device("cpu"))
    trained = saved.classifier()
    attn = resolve_attn("auto", cuda=False, needs=attention_needs(trained.config))  # eager for soft-capped models
    trained.config._attn_implementation = hf_attn_implementation(attn)
    with torch.no_grad():
        expected = kind.export_values(kind.reward_model(trained, attn)(batch).float())
    # LoRA: rebuilt, then merged (an ensemble: each member)
    members = (
        exported_classifiers(saved.settings, saved.state, saved.dtype, tokenizer, kind) if saved.settings else [trained]
    )
    classifier = members[0]
    if merge:
        expected = kind.rewards(expected)
        kind = kind.merge(classifier)
    convention = getattr(saved.config, CONVENTION_KEY, None)
    tol = tolerance(classifier.dtype, saved.settings.quantization.bits if saved.settings else 0)

    def write(tmp: Path) -> None:
        save_export(
            members, classifier.state_dict(), tokenizer, tmp, saved.reward_stats, convention, kind, saved.config
        )
        stages.advance()

    def verified(tmp: Path) -> str | None:
        return check(expected, kind.plain_rewards(tmp, seqs, torch.device("cpu")), tol, dest)

    with progress.transformers_bars():
        problem = write_verified(dest, write, verified)
    stages.advance()
    if problem:
        raise ExportError(problem)
    return expected
