"""Packed rewards against plain transformers, per backbone family (the families of tests/conftest.py's BACKBONES):

    python bench/bench_backbones.py

Per family and CPU backend (auto, sdpa, eager), fp32: the largest absolute difference between bigrm's packed
rewards (prompts packed, and shared with share_prompt) and each sequence forwarded alone through plain transformers,
on sequences longer than every window (8 tokens). `feature ignored`: the packed forward with each of the model's
features dropped in turn (bigrm before windows and soft-capping were honoured): what the comparison is sensitive to. A
refused backend shows its error.
"""

from __future__ import annotations

import sys
import tempfile
import unittest.mock
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.helpers
from bigrm.data.packing import collate  # noqa: E402
from bigrm.errors import ConfigError  # noqa: E402
from bigrm.model.attention import SOFTCAP, read_attention_needs, resolve_attn  # noqa: E402
from bigrm.model.reward_model import RewardModel, load_classifier  # noqa: E402
from tests.helpers.groups import shared_groups  # noqa: E402
from tests.helpers.models import BACKBONES, write_backbone  # noqa: E402

GROUPS = shared_groups(0, ks=(2, 3, 6, 4), prompt_len=(10, 40))


def worst(model: RewardModel, want: torch.Tensor, share: bool) -> float:
    with torch.no_grad():
        got = model(collate(GROUPS, pad_id=0, share_prompt=share))
    return (got - want).abs().max().item()


def row(path: Path, family: str) -> list[str]:
    plain = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.stack([plain(input_ids=torch.from_numpy(s)[None]).logits[0, 0] for g in GROUPS for s in g.seqs])
    needs = read_attention_needs(str(path))
    tok = AutoTokenizer.from_pretrained(path)
    cells = [family, ", ".join(needs.features) or "plain causal"]
    for attn in ("auto", "sdpa", "eager"):
        try:
            impl = resolve_attn(attn, cuda=False, needs=needs)
        except ConfigError as refused:
            cells.append(f"refused: {refused}")
            continue
        model = RewardModel(load_classifier(str(path), torch.float32, impl, tok), impl).eval()
        label = f"{impl}: " if attn == "auto" else ""
        cells.append(label + " / ".join(f"{worst(model, want, share):.1e}" for share in (False, True)))
    cells.append(" / ".join(f"{ignored(path, tok, want, f):.2f}" for f in needs.features) or "-")
    return cells


def ignored(path: Path, tok, want: torch.Tensor, feature: str) -> float:
    """The packed forward with `feature` dropped: windows under sdpa, soft-capping under FlexAttention (CPU reference
    implementation, which takes a score_mod)."""
    if feature == SOFTCAP:
        model = RewardModel(load_classifier(str(path), torch.float32, "flex", tok), "flex").eval()
        no_softcap = unittest.mock.patch("bigrm.model.packed_attention._softcap_score", lambda cap: None)
        with warnings.catch_warnings(), no_softcap:
            warnings.simplefilter("ignore")  # flex's notice that uncompiled it is a slow reference: meant here
            return worst(model, want, False)
    model = RewardModel(load_classifier(str(path), torch.float32, "eager", tok), "eager").eval()
    model.needs = read_attention_needs("")  # no window in any mask
    return worst(model, want, False)


def main() -> None:
    head = ["family", "feature", "auto (packed / shared)", "sdpa", "eager", "feature ignored"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    with tempfile.TemporaryDirectory() as tmp:
        for family in BACKBONES:
            print("| " + " | ".join(row(write_backbone(Path(tmp) / family, family), family)) + " |", flush=True)
    lengths = [len(s) for g in GROUPS for s in g.seqs]
    print(f"\n{len(lengths)} sequences of {min(lengths)}-{max(lengths)} tokens, fp32, CPU")


if __name__ == "__main__":
    main()
