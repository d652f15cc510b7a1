"""Reward hacking defences side by side: plain Bradley–Terry vs length-disentangled (ODIN) on the length-biased task.

    python bench/bench_hacking.py [--train 4000] [--eval 2000] [--epochs 6] [--seeds 0 1 2] [--threads 2]

Data: the built-in length-biased task (data.synthetic.task=length, bigrm.builtin.synthetic.make_length_rows):
training pairs whose labels prefer the longer review in `--bias` of the pairs where it is the worse, held-out pairs
labelled by sentiment alone, the better review the longer in half of them. Both models start from the same random
tiny Llama backbone (bigrm.builtin.tiny; the value head has one row or two), see the same micro-batches in the same
order (--budget tokens each, one AdamW step per micro-batch) and train with their kind's own loss (bigrm.kinds:
Scalar, Length with loss.length_coef and loss.orthogonal_coef, defaults unless given). Reported per seed and as the mean
over seeds: the reward's |Spearman| with completion length (tokens) over the held-out completions (for the
length-disentangled model the reward is its quality output; its length output's Spearman is shown beside it),
pairwise accuracy on the length-balanced held-out pairs, and the seconds each run took.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bigrm.builtin.synthetic import make_length_rows  # noqa: E402
from bigrm.builtin.tiny import write_tiny  # noqa: E402
from bigrm.config import DataConfig, LossConfig  # noqa: E402
from bigrm.data.packing import collate, completion_lengths, layout_tokens, pack_bins  # noqa: E402
from bigrm.data.rows import load_examples  # noqa: E402
from bigrm.data.tokenise import tokenize_examples  # noqa: E402
from bigrm.evaluation.correlation import spearman  # noqa: E402
from bigrm.kinds import Length, RewardKind, Scalar  # noqa: E402
from bigrm.model.reward_model import RewardModel, load_classifier, write_random_init  # noqa: E402
from bigrm.training.evaluate import evaluate_rewards  # noqa: E402

MAX_LENGTH = 64


def groups_of(rows: list[dict], path: Path, tok) -> list:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (examples,), _ = load_examples([str(path)], DataConfig(max_length=MAX_LENGTH))
    return tokenize_examples(examples, tok, MAX_LENGTH, "error")[0]


def train(kind: RewardKind, init: Path, tok, batches: list, lr: float, cfg: LossConfig) -> tuple[RewardModel, float]:
    classifier = load_classifier(str(init), torch.float32, "sdpa", tok, num_labels=kind.outputs)
    model = RewardModel(classifier, "sdpa", kind.vector, kind.head_gram).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    start = time.perf_counter()
    for groups in batches:
        batch = collate(groups, tok.pad_token_id)
        loss, _, _ = kind.loss(model(batch), batch.labels, cfg, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval(), time.perf_counter() - start


def measure(model: RewardModel, kind: RewardKind, held: list, tok) -> dict:
    cpu, lengths = torch.device("cpu"), torch.tensor(completion_lengths(held), dtype=torch.float64)
    metrics, rewards = evaluate_rewards(
        model, held, budget=4096, window=len(held), pad_id=tok.pad_token_id, device=cpu, cfg=LossConfig(), kind=kind
    )
    out = {"spearman": abs(spearman(rewards, lengths)), "accuracy": metrics["pairwise_accuracy"]}
    if "length_spearman_length" in metrics:
        out["length_head_spearman"] = metrics["length_spearman_length"]
    return out


def run_seed(args, seed: int, root: Path) -> dict[str, dict]:
    from transformers import AutoTokenizer

    src = write_tiny(root / "tiny")
    tok = AutoTokenizer.from_pretrained(src)
    train_groups = groups_of(make_length_rows(args.train, seed, args.bias, held_out=False), root / "train.jsonl", tok)
    held = groups_of(make_length_rows(args.eval, seed + 1, args.bias, held_out=True), root / "eval.jsonl", tok)
    sizes = [layout_tokens(g, False) for g in train_groups]
    rng, batches = random.Random(seed), []
    for _ in range(args.epochs):
        order = list(range(len(train_groups)))
        rng.shuffle(order)
        batches += [[train_groups[i] for i in b] for b in pack_bins(order, sizes, args.budget, window=64)]
    results = {}
    for name, kind in (("plain BT", Scalar()), ("length-disentangled", Length())):
        init = root / f"init-{kind.outputs}"
        torch.manual_seed(0)
        write_random_init(str(src), str(init), seed, num_labels=kind.outputs)  # the same backbone weights
        torch.manual_seed(seed)
        cfg = LossConfig(length_coef=args.length_coef, orthogonal_coef=args.orthogonal_coef)
        model, seconds = train(kind, init, tok, batches, args.lr, cfg)
        results[name] = {**measure(model, kind, held, tok), "seconds": seconds, "updates": len(batches)}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=4000, help="training pairs")
    p.add_argument("--eval", type=int, default=2000, help="held-out pairs")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--bias", type=float, default=0.6, help="data.synthetic.length_bias")
    p.add_argument("--budget", type=int, default=1024, help="tokens per micro-batch (one AdamW step each)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--length-coef", dest="length_coef", type=float, default=LossConfig.length_coef)
    p.add_argument("--orthogonal-coef", dest="orthogonal_coef", type=float, default=LossConfig.orthogonal_coef)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    every = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            every[seed] = run_seed(args, seed, Path(tmp))
        for name, r in every[seed].items():
            extra = f", length head {r['length_head_spearman']:.3f}" if "length_head_spearman" in r else ""
            print(f"seed {seed} {name:20s} |Spearman(reward, length)| {r['spearman']:.3f}{extra}, "
                  f"accuracy {r['accuracy']:.3f}, {r['updates']} updates in {r['seconds']:.1f} s")  # fmt: skip
    print("\n| model | |Spearman(reward, length)| (held-out) | accuracy (length-balanced) | s per run |")
    print("|---|---|---|---|")
    for name in every[args.seeds[0]]:
        rs = [every[s][name] for s in args.seeds]
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("spearman", "accuracy", "seconds")}
        print(f"| {name} | {mean['spearman']:.3f} | {mean['accuracy']:.3f} | {mean['seconds']:.0f} |")


if __name__ == "__main__":
    main()
