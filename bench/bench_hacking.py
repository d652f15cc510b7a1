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
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bigrm.artifacts.export import save_classifier, seal  # noqa: E402
from bigrm.artifacts.merge import merge  # noqa: E402
from bigrm.builtin.synthetic import make_length_rows, make_noisy_rows, make_rows  # noqa: E402
from bigrm.builtin.tiny import write_tiny  # noqa: E402
from bigrm.config import DataConfig, LoraConfig, LossConfig  # noqa: E402
from bigrm.data.packing import collate, completion_lengths, layout_tokens, pack_bins  # noqa: E402
from bigrm.data.rows import load_examples  # noqa: E402
from bigrm.data.tokenise import tokenize_examples  # noqa: E402
from bigrm.evaluation.correlation import spearman  # noqa: E402
from bigrm.kinds import Ensemble, Length, RewardKind, Scalar  # noqa: E402
from bigrm.model.adapters import add_lora  # noqa: E402
from bigrm.model.ensemble import member_names  # noqa: E402
from bigrm.model.reward_model import RewardModel, load_classifier, write_random_init  # noqa: E402
from bigrm.training.evaluate import evaluate_rewards  # noqa: E402

MAX_LENGTH = 64


def groups_of(rows: list[dict], path: Path, tok) -> list:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (examples,), _ = load_examples([str(path)], DataConfig(max_length=MAX_LENGTH))
    return tokenize_examples(examples, tok, MAX_LENGTH, "error")[0]


def train(kind: RewardKind, init: Path, tok, batches: list, lr: float, cfg: LossConfig, lora: LoraConfig | None = None):
    """(trained model, seconds): one AdamW step per micro-batch; with `lora`, the kind's adapters on a frozen base."""
    classifier = load_classifier(str(init), torch.float32, "sdpa", tok, num_labels=kind.outputs)
    if lora:
        add_lora(classifier, lora, kind.adapters)
    model = kind.reward_model(classifier, "sdpa").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
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


def batches_of(train_groups: list, args, seed: int, epochs: int | None = None) -> list[list]:
    """`epochs` (args.epochs) shuffled passes, packed into micro-batches of args.budget tokens."""
    sizes = [layout_tokens(g, False) for g in train_groups]
    rng, batches = random.Random(seed), []
    for _ in range(epochs or args.epochs):
        order = list(range(len(train_groups)))
        rng.shuffle(order)
        batches += [[train_groups[i] for i in b] for b in pack_bins(order, sizes, args.budget, window=64)]
    return batches


def run_seed(args, seed: int, root: Path) -> dict[str, dict]:
    from transformers import AutoTokenizer

    src = write_tiny(root / "tiny")
    tok = AutoTokenizer.from_pretrained(src)
    train_groups = groups_of(make_length_rows(args.train, seed, args.bias, held_out=False), root / "train.jsonl", tok)
    held = groups_of(make_length_rows(args.eval, seed + 1, args.bias, held_out=True), root / "eval.jsonl", tok)
    batches = batches_of(train_groups, args, seed)
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


LORA = LoraConfig(r=8, alpha=16)


def tiny_task(root: Path, make, args, seed: int):
    """(tokenizer, model source, training groups, held-out groups) of a built-in task: make(n, seed, held_out)."""
    from transformers import AutoTokenizer

    src = write_tiny(root / "tiny")
    tok = AutoTokenizer.from_pretrained(src)
    train_groups = groups_of(make(args.train, seed, held_out=False), root / "train.jsonl", tok)
    return tok, src, train_groups, groups_of(make(args.eval, seed + 1, held_out=True), root / "eval.jsonl", tok)


def evaluated(model, kind: RewardKind, held: list, tok) -> dict:
    cpu = torch.device("cpu")
    return evaluate_rewards(
        model, held, budget=4096, window=len(held), pad_id=tok.pad_token_id, device=cpu, cfg=LossConfig(), kind=kind
    )[0]


def pretrained(root: Path, src: Path, tok, args) -> Path:
    """The stand-in for a pretrained backbone that LoRA adapts (LoRA on random weights learns nothing here): the
    random tiny Llama fully fine-tuned for one epoch on args.base_train rows of the clean ranked task (prompts of
    their own, seed 1000), saved with its head."""
    write_random_init(str(src), str(root / "random"), 0)
    rows = make_rows(args.base_train, 2, 6, 1000)
    groups = groups_of(rows, root / "base.jsonl", tok)
    torch.manual_seed(1000)
    model, _ = train(Scalar(), root / "random", tok, batches_of(groups, args, 1000, epochs=1), args.lr, LossConfig())
    model.classifier.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base"


def run_ensemble_seed(args, seed: int, root: Path) -> dict:
    """The noisy-label task: an ensemble of args.members LoRA members, its members' and mean's held-out figures."""
    tok, src, train_groups, held = tiny_task(root, partial(make_noisy_rows, noise=args.noise), args, seed)
    init = pretrained(root, src, tok, args)
    torch.manual_seed(seed)  # the members' adapters and head rows
    kind = Ensemble(args.members, bootstrap=not args.no_bootstrap)
    model, seconds = train(kind, init, tok, batches_of(train_groups, args, seed), args.lora_lr, LossConfig(), LORA)
    return {**evaluated(model.eval(), kind, held, tok), "seconds": seconds}


def member_cost(members: int, init: Path, tok, batch, repeats: int) -> dict:
    """Seconds per forward+backward of one micro-batch, bytes the forward saves for backward (distinct storages) and
    bytes of trained state (fp32 weights, gradients and AdamW's two moments: 16 per trained weight)."""
    classifier = load_classifier(str(init), torch.float32, "sdpa", tok, num_labels=members)
    add_lora(classifier, LORA, member_names(members))
    kind = Ensemble(members)
    model = kind.reward_model(classifier, "sdpa").train()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kind.loss(model(batch), batch.labels, LossConfig(), None)[0].backward()
    start = time.perf_counter()
    for _ in range(repeats):
        kind.loss(model(batch), batch.labels, LossConfig(), None)[0].backward()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds = (time.perf_counter() - start) / repeats
    return {"seconds": seconds, "saved_mib": sum(storages.values()) / 2**20, "state_mib": 16 * trained / 2**20}


def run_merge_seed(args, seed: int, root: Path) -> dict:
    """The built-in ranked task: two runs from the pretrained stand-in (head included) whose data order comes from
    different seeds, exported and averaged by `bigrm merge`; each model's held-out accuracy."""
    tok, src, train_groups, held = tiny_task(root, lambda n, s, held_out: make_rows(n, 2, 6, s), args, seed)
    init = pretrained(root, src, tok, args)
    out = {}
    for name, run in (("a", seed), ("b", seed + 1000)):
        torch.manual_seed(run)
        model, _ = train(Scalar(), init, tok, batches_of(train_groups, args, run), args.lr, LossConfig())
        out[name] = evaluated(model.eval(), Scalar(), held, tok)["pairwise_accuracy"]
        save_classifier(model.classifier, model.classifier.state_dict(), tok, root / name)
        seal(root / name)
    merge([root / "a", root / "b"], root / "merged")
    merged = Scalar().load_export(root / "merged", torch.float32, "sdpa", tok)
    out["merged"] = evaluated(RewardModel(merged, "sdpa").eval(), Scalar(), held, tok)["pairwise_accuracy"]
    return out


def ensemble_main(args) -> None:
    rows = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            r = rows[seed] = run_ensemble_seed(args, seed, Path(tmp))
        members = " ".join(f"{r[f'member_{m}_accuracy']:.3f}" for m in range(args.members))
        print(f"seed {seed} ensemble of {args.members}: members {members}, mean {r['ensemble_mean_accuracy']:.3f}, "
              f"spread AUROC {r['spread_auroc']:.3f}, {r['seconds']:.0f} s")  # fmt: skip
    print(
        "\n| seed | best member | mean of members | ensemble mean | spread AUROC (wrong pair) |\n|---|---|---|---|---|"
    )
    for seed, r in rows.items():
        average = sum(r[f"member_{m}_accuracy"] for m in range(args.members)) / args.members
        print(f"| {seed} | {r['best_member_accuracy']:.3f} | {average:.3f} | {r['ensemble_mean_accuracy']:.3f} | "
              f"{r['spread_auroc']:.3f} |")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tok, src, train_groups, _ = tiny_task(Path(tmp), partial(make_noisy_rows, noise=args.noise), args, 0)
        batch = collate(batches_of(train_groups, args, 0)[0], tok.pad_token_id)
        print(f"\ncost per micro-batch ({batch.real_tokens} tokens), forward + backward:")
        print("| members | s per fwd+bwd | saved for backward MiB | trained state MiB |\n|---|---|---|---|")
        for members in (1, 2, 4):
            init = Path(tmp) / f"init-{members}"
            write_random_init(str(src), str(init), 0, num_labels=members)
            c = member_cost(members, init, tok, batch, args.cost_repeats)
            print(f"| {members} | {c['seconds']:.3f} | {c['saved_mib']:.1f} | {c['state_mib']:.2f} |")
    print("\n| seed | run a | run b | mean of a, b | merged (bigrm merge) |\n|---|---|---|---|---|")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            m = run_merge_seed(args, seed, Path(tmp))
        print(f"| {seed} | {m['a']:.3f} | {m['b']:.3f} | {(m['a'] + m['b']) / 2:.3f} | {m['merged']:.3f} |")


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
    p.add_argument("--mode", choices=("length", "ensemble"), default="length")
    p.add_argument("--members", type=int, default=4, help="ensemble mode: loss.ensemble")
    p.add_argument("--noise", type=float, default=0.25, help="ensemble mode: data.synthetic.noise")
    p.add_argument("--lora-lr", dest="lora_lr", type=float, default=3e-3, help="ensemble mode: LoRA members' lr")
    p.add_argument("--no-bootstrap", dest="no_bootstrap", action="store_true", help="loss.ensemble_bootstrap false")
    p.add_argument("--base-train", dest="base_train", type=int, default=500, help="ensemble mode: rows of the base")
    p.add_argument("--cost-repeats", dest="cost_repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "ensemble":
        ensemble_main(args)
    else:
        length_main(args)


def length_main(args) -> None:
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
