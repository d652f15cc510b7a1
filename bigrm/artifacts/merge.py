"""`bigrm merge`: a weighted average of exported reward models, or ExPO extrapolation, written as a verified export.

Averaging (model soups) and extrapolation θ = θ_a + α(θ_a − θ_b) (ExPO, arXiv 2404.16792) are one operation: a
weighted sum of the exports' weights, (w_1 … w_N) normalised to sum 1, or (1 + α, −α). It is computed in float64 and
written in the first export's dtype, so α = 0 returns model a bit for bit. Only exports that mean the same thing
merge: the same architecture (config and weight shapes), tokenizer, reward convention and reward kind; anything else
is refused before any weights load. The result verifies itself as every export does (bigrm.artifacts.export): its
packed forward against plain transformers re-loading the written directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bigrm import progress
from bigrm.artifacts.export import (
    CONVENTION_KEY,
    check,
    check_destination,
    check_export,
    save_classifier,
    tolerance,
    write_verified,
)
from bigrm.data.packing import collate
from bigrm.data.sequences import Group
from bigrm.errors import ConfigError, ExportError
from bigrm.kinds import RewardKind, for_model
from bigrm.kinds.length import LENGTH_HEAD_KEY
from bigrm.model.attention import read_attention_needs, resolve_attn
from bigrm.model.reward_model import RewardModel

# config.json key of what was merged: the sources and their weights
MERGED_FROM_KEY = "bigrm_merged_from"
# one source's reward statistics (and length head, kinds.length) describe none of the merged model: dropped
STALE_KEYS = ("bigrm_reward_mean", "bigrm_reward_std", "mean", "std", LENGTH_HEAD_KEY)
# what may differ between exports of one architecture
UNCOMPARED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", MERGED_FROM_KEY, *STALE_KEYS}
VERIFY_SEED, VERIFY_SEQUENCES = 0, 8


def coefficients(n: int, weights: list[float] | None, alpha: float | None) -> list[float]:
    """Per export its coefficient in the weighted sum; `weights` are normalised to sum 1, `alpha` is ExPO's."""
    if alpha is not None:
        if n != 2 or weights is not None:
            raise ConfigError("--alpha (ExPO): give exactly two --models (a, then b) and no --weights")
        return [1.0 + alpha, -alpha]
    if n < 2:
        raise ConfigError(f"--models: averaging needs two exports or more, got {n}")
    weights = [1.0] * n if weights is None else weights
    if len(weights) != n:
        raise ConfigError(f"--weights: {len(weights)} weights for {n} --models")
    if any(w <= 0 for w in weights):
        raise ConfigError(f"--weights: each weight must be positive, got {weights}")
    return [w / sum(weights) for w in weights]


def _sections(config: dict) -> dict[str, dict]:
    """What must agree between merged exports, by the name a refusal gives it."""
    own = {k: v for k, v in config.items() if k.startswith("bigrm_") and k not in UNCOMPARED}
    convention = {CONVENTION_KEY: own.pop(CONVENTION_KEY, None)}
    return {
        "reward kinds": own,  # what the kind records (an attribute head, a step separator, a merged head)
        "reward conventions": convention,
        "architectures": {k: v for k, v in config.items() if not k.startswith("bigrm_") and k not in UNCOMPARED},
    }


def _first_difference(a: dict, b: dict) -> str | None:
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} vs {b.get(key)!r}"
    return None


def _read(path: Path) -> tuple[str, dict[str, dict], dict]:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return for_model(config).name, _sections(config.to_dict()), (tokenizer.get_vocab(), tokenizer.special_tokens_map)


def check_compatible(paths: list[Path]) -> None:
    """ConfigError, in one line, when an export differs from the first in what makes merged weights meaningful."""
    kind, sections, vocab = _read(paths[0])
    for path in paths[1:]:
        other_kind, other_sections, other_vocab = _read(path)
        problems = [("reward kinds", f"{kind} vs {other_kind}" if kind != other_kind else None)]
        problems += [(what, _first_difference(part, other_sections[what])) for what, part in sections.items()]
        problems.insert(-1, ("tokenizers", "vocabularies or special tokens" if vocab != other_vocab else None))
        for what, difference in problems:
            if difference:
                raise ConfigError(f"bigrm merge: {paths[0]} and {path} have different {what} ({difference})")


def _load(path: Path, kind: RewardKind):
    from transformers import AutoTokenizer

    from bigrm.data.tokenizer import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    attn = resolve_attn("auto", cuda=False, needs=read_attention_needs(str(path)))
    return kind.load_export(path, "auto", attn, tokenizer).eval(), tokenizer, attn


def merged_state(paths: list[Path], coefs: list[float], kind: RewardKind) -> dict[str, torch.Tensor]:
    """Σ_i c_i θ_i in float64, over the kind's loaded form of each export (two models in memory at a time)."""
    total: dict[str, torch.Tensor] = {}
    for path, c in zip(paths, coefs, strict=True):
        state = _load(path, kind)[0].state_dict()
        if total and {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in total.items()}:
            raise ConfigError(f"bigrm merge: {paths[0]} and {path} have different architectures (weight shapes)")
        for key, value in state.items():
            total[key] = total.get(key, 0) + c * value.double()
    return total


def _verification(vocab: int) -> tuple[list[Group], list[list[int]]]:
    rng = np.random.default_rng(VERIFY_SEED)
    seqs = [rng.integers(0, vocab, int(rng.integers(4, 48))) for _ in range(VERIFY_SEQUENCES)]
    groups = [Group((seqs[i], seqs[i + 1]), "verify") for i in range(0, len(seqs), 2)]
    return groups, [s.tolist() for s in seqs]


def merge(paths: list[Path], dest: Path, weights: list[float] | None = None, alpha: float | None = None) -> dict:
    """`bigrm merge`: writes the merged export at `dest`, verified; returns what config.json records of it."""
    from transformers import AutoConfig

    coefs = coefficients(len(paths), weights, alpha)
    for path in paths:
        check_export(path)  # only whole, verified exports are merged
    check_destination(dest, "--out")
    check_compatible(paths)
    kind = for_model(AutoConfig.from_pretrained(paths[0]))
    if not kind.one_model:
        raise ConfigError(f"bigrm merge: {paths[0]} is an ensemble of {kind.outputs}: merge its member_* exports")
    with progress.transformers_bars():
        classifier, tokenizer, attn = _load(paths[0], kind)
        total = merged_state(paths, coefs, kind)
    state = classifier.state_dict()
    classifier.load_state_dict({k: total[k].to(v.dtype) for k, v in state.items()}, strict=True)
    groups, seqs = _verification(classifier.get_input_embeddings().num_embeddings)
    with torch.no_grad():
        expected = RewardModel(classifier, attn, kind.vector)(collate(groups, tokenizer.pad_token_id)).float()
    config = classifier.config
    for key in STALE_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    record = {
        "models": [str(p) for p in paths],
        "coefficients": coefs,
        **({"alpha": alpha} if alpha is not None else {}),
    }
    setattr(config, MERGED_FROM_KEY, record)
    tol = tolerance(next(classifier.parameters()).dtype)

    def write(tmp: Path) -> None:
        save_classifier(classifier, classifier.state_dict(), tokenizer, tmp, kind=kind)

    def verified(tmp: Path) -> str | None:
        return check(expected, kind.plain_rewards(tmp, seqs, torch.device("cpu")), tol, dest)

    with progress.transformers_bars():
        problem = write_verified(dest, write, verified)
    if problem:
        raise ExportError(problem)
    return json.loads((dest / "config.json").read_text())[MERGED_FROM_KEY]
