"""Which token a consumer reads, and what it costs when it is not the one the RM was trained at.

For text rows and chat rows of the built-in task, trains the default tiny model with each reward convention
(`data.reward_convention`: trl, grpo, openrlhf; 2 CPU ranks, ZeRO-3), then evaluates every run under every
convention with `bigrm eval`: the diagonal is what a consumer whose convention matches sees, the rest what a consumer
reading another token sees (TRL GRPO reads `grpo` on text prompts, OpenRLHF `openrlhf`, TRL RewardTrainer,
RewardBench and GRPO's chat path `trl`). Prints one table of held-out pairwise accuracies, measured in this run.

    python bench/bench_conventions.py --num-train 2000 --out /tmp/conventions
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigrm.builtin.synthetic import make_rows  # noqa: E402
from bigrm.config import REWARD_CONVENTIONS  # noqa: E402


def write_rows(path: Path, rows: list[dict], chat: bool) -> Path:
    if chat:
        rows = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "ranked_outputs": [c.strip() for c in r["ranked_outputs"]],
            }
            for r in rows
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as fh:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-eval", type=int, default=300)
    args = p.parse_args()
    bin_dir = Path(sys.executable).parent
    table = {}
    for kind in ("text", "chat"):
        work = args.out / kind
        work.mkdir(parents=True, exist_ok=True)
        train = write_rows(work / "train.jsonl", make_rows(args.num_train, 2, 6, 0), kind == "chat")
        held = write_rows(work / "eval.jsonl", make_rows(args.num_eval, 2, 6, 1), kind == "chat")
        for trained in REWARD_CONVENTIONS:
            out = work / f"trained-{trained}"
            run(
                [str(bin_dir / "deepspeed"), "--num_gpus", "2", "launch/train.py", "--output_dir", str(out),
                 "--overwrite_output_dir", "true",
                 "--data.train_files", f"[{train}]", "--data.eval_files", f"[{held}]",
                 "--data.reward_convention", trained, "--report_to", "none"],
                work / f"train-{trained}.log",
            )  # fmt: skip
            for read in REWARD_CONVENTIONS:
                metrics = work / f"eval-{trained}-{read}.json"
                run(
                    [str(bin_dir / "bigrm"), "eval", "--model", str(out / "final"), "--data", str(held),
                     "--data.reward_convention", read, "--out", str(metrics)],
                    work / f"eval-{trained}-{read}.log",
                )  # fmt: skip
                table[kind, trained, read] = json.loads(metrics.read_text())["pairwise_accuracy"]
    print(f"held-out pairwise accuracy ({args.num_train} training prompts, K = 2..6, {args.num_eval} eval prompts)")
    print("| rows | trained with | " + " | ".join(f"read as {r}" for r in REWARD_CONVENTIONS) + " |")
    print("|---|---|" + "---|" * len(REWARD_CONVENTIONS))
    for kind in ("text", "chat"):
        for trained in REWARD_CONVENTIONS:
            cells = " | ".join(f"{table[kind, trained, r]:.3f}" for r in REWARD_CONVENTIONS)
            print(f"| {kind} | {trained} | {cells} |")
    (args.out / "conventions.json").write_text(json.dumps({"|".join(k): v for k, v in table.items()}, indent=2))


if __name__ == "__main__":
    main()
