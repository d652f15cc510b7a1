"""Command-line entry points: `bigrm train | prepare | export | score | eval` (`launch/train.py` is `bigrm train`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path

from bigrm import config, dist, options, precision
from bigrm.errors import BigrmError, ConfigError
from bigrm.kinds import RewardKind
from bigrm.training.preemption import EXIT_CODE, Preempted, Terminated


def _run(fn, *args) -> int:
    try:
        fn(*args)
    except BigrmError as err:
        if dist.launched_rank() == 0:  # every rank meets the same bad input: one message, not one per rank
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def train_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(options.help_text())
        return 0

    def train() -> None:
        from bigrm.training.trainer import run

        run(options.from_argv(argv))

    try:
        return _run(train)
    except Preempted:  # the trainer has said where it stopped; launchers and slurm/train.sbatch act on the code
        return EXIT_CODE
    except Terminated as err:
        signum = err.args[0]
        if dist.launched_rank() == 0:
            name = signal.Signals(signum).name
            print(f"stopped by {name}: continue from the last complete checkpoint with --resume auto", file=sys.stderr)
        return 128 + signum  # the shell's code for a process ended by that signal
    except Exception as err:
        gone = dist.peer_gone(err)
        if not gone:
            raise
        # not this rank's failure: one line instead of a traceback through DeepSpeed's collectives
        print(f"rank {dist.launched_rank()} stopped: another rank went away (gloo: {gone})", file=sys.stderr)
        return 1


def _sections(extra: list[str], allowed: tuple[str, ...], convention: str | None, kind: RewardKind) -> config.Config:
    """`--data.x value` (and for eval `--loss.x value`) options, as in training; `data.reward_convention` defaults to
    `convention`, the one the model records (it was trained to score that token), and the data options the model's
    kind reads its labels with to the kind's (kind.data_defaults: an attribute head's names)."""
    values = options.parse_overrides(extra)
    for key, value in kind.data_defaults().items():
        values.setdefault(key, value)
    outside = [k for k in values if not k.startswith(allowed)]
    if outside:
        raise ConfigError(f"only {', '.join(a + '*' for a in allowed)} options apply here: {', '.join(outside)}")
    given = values.setdefault("data.reward_convention", convention or config.DataConfig.reward_convention)
    if convention and given != convention:
        print(f"warning: scoring with data.reward_convention={given}; the model was trained with {convention}")
    recorded = " (recorded in the model)" if given == convention else ""
    print(f"rewards read as data.reward_convention={given}{recorded}")
    return options.build(values)


def writable(path: str, flag: str) -> None:
    """An output file, checked before any scoring: its directory is created, and it must not be a directory."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot create its directory ({err.strerror})") from err


def report_dir(path: str) -> None:
    """`bigrm eval --report DIR`, checked before any scoring: matplotlib present, DIR a directory it can create."""
    from bigrm.evaluation.report import check_installed

    check_installed("--report")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--report {path}: is a file; give a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--report {path}: cannot create it ({err.strerror})") from err


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported directory or a bigrm checkpoint (checkpoints/step-*)")
    p.add_argument("--data", required=True, help="rows in any training format (.jsonl, .json, .parquet, a dir)")
    p.add_argument("--max_tokens_per_batch", type=int, default=16384, help="token budget of one packed forward")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="auto", choices=precision.CHOICES)
    p.add_argument("--attn_impl", default="auto", choices=config.ATTN_IMPLS)
    p.add_argument("--share_prompt", action="store_true", help="encode each prompt once (rewards unchanged)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"bigrm {prog}",
        description=description,
        epilog="--data.KEY VALUE options (columns, max_length, skip_invalid, overlong, ...) and, for eval, "
        "--loss.KEY VALUE options (the reported loss and tie_threshold) work as in training; see `bigrm train --help`.",
    )


def score_main(argv: list[str]) -> int:
    p = _parser("score", "Write each input row with `rewards` aligned with its completions.")
    _model_args(p)
    p.add_argument("--out", required=True, help="output JSON Lines file")
    p.add_argument("--segments", action="store_true", help="reward every piece of completions given as lists")
    p.add_argument("--separator", help="with --segments: split text completions after each SEPARATOR instead")
    p.add_argument("--per-token", dest="per_token", action="store_true", help="value at every completion token")
    args, extra = p.parse_known_args(argv)

    def score() -> None:
        import torch

        from bigrm.inference import scoring

        writable(args.out, "--out")
        device = torch.device(args.device)
        model, tokenizer, convention, kind = scoring.load_model(args.model, device, args.dtype, args.attn_impl)
        segments = args.segments or args.separator is not None
        cfg = _sections(extra, ("data.",), convention, kind)
        results = scoring.prepare(args.data, cfg.data, tokenizer, segments, args.separator)
        print(f"prompt truncation (data.max_length={cfg.data.max_length}): {scoring.cut_summary(results)}")
        every, kind = segments or args.per_token, scoring.kind_for_rows(model, results)
        scoring.score(model, results, args.max_tokens_per_batch, device, every, args.share_prompt, kind)
        out = Path(args.out)
        with out.open("w") as fh:
            for r in results:
                row = scoring.output_row(r, segments, args.per_token, kind)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        skipped = sum(r.rewards is None for r in results)
        print(f"scored {len(results) - skipped} rows, skipped {skipped} (with their reason in `error`) → {out}")

    return _run(score)


def eval_main(argv: list[str]) -> int:
    p = _parser("eval", "Ranking metrics and reward diagnostics of a reward model on a labelled file.")
    _model_args(p)
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.add_argument(
        "--report",
        metavar="DIR",
        help="also draw the eval there: PNG plots (calibration, reward histograms, reward vs length, accuracy by K "
        "and subset), report.md embedding them, report.json with the numbers drawn (needs bigrm[report])",
    )
    args, extra = p.parse_known_args(argv)

    def evaluate() -> None:
        import torch

        from bigrm.inference import scoring

        if args.out:
            writable(args.out, "--out")
        if args.report:
            report_dir(args.report)
        device = torch.device(args.device)
        model, tokenizer, convention, kind = scoring.load_model(args.model, device, args.dtype, args.attn_impl)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the metrics JSON alone
            cfg = _sections(extra, ("data.", "loss."), convention, kind)
            results = scoring.prepare(args.data, cfg.data, tokenizer)
            print(f"prompt truncation (data.max_length={cfg.data.max_length}): {scoring.cut_summary(results)}")
        kind = scoring.kind_for_rows(model, results)
        scoring.score(model, results, args.max_tokens_per_batch, device, False, args.share_prompt, kind)
        metrics = scoring.report(results, cfg.loss, kind, Path(args.report) if args.report else None)
        text = json.dumps(metrics, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")

    return _run(evaluate)


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="bigrm export", description="A training checkpoint → a verified plain Hugging Face classifier."
    )
    p.add_argument("--checkpoint", required=True, help="a complete checkpoint directory (checkpoints/step-*)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--dtype", default="auto", choices=precision.CHOICES, help="auto: the training dtype")
    p.add_argument(
        "--merge-attributes",
        dest="merge_attributes",
        action="store_true",
        help="attribute heads (data.attributes): write the 1-logit model whose logit is the scalar reward "
        "Σ_a w_a v_a (loss.attribute_weights), the head's rows combined by the weights, for consumers that read one "
        "score (RewardBench, TRL, OpenRLHF)",
    )
    args = p.parse_args(argv)

    def do_export() -> None:
        from bigrm.artifacts.export import export_checkpoint

        path, out, dtype = Path(args.checkpoint), Path(args.out), precision.saved(args.dtype)
        rewards = export_checkpoint(path, out, dtype, args.merge_attributes)
        print(f"exported {args.checkpoint} → {args.out} (verified on {len(rewards)} held-out sequences)")

    return _run(do_export)


def prepare_main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(
            "usage: bigrm prepare [--config FILE.yaml] [--section.key VALUE ...]\n"
            "Validate and tokenise the data of a training run into the token cache (data.cache_dir) ahead of time, "
            "with every core (data.num_proc), and print the report training prints. A training run with the same "
            "data options, tokenizer and files memory-maps it instead of tokenising. Takes the training options:\n"
            + options.help_text()
        )
        return 0

    def prepare() -> None:
        from bigrm.data.pipeline import prepare

        for line in prepare(options.from_argv(argv)).log:
            print(line)

    return _run(prepare)


COMMANDS = {"train": train_main, "prepare": prepare_main, "export": export_main, "score": score_main, "eval": eval_main}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: bigrm {{{','.join(COMMANDS)}}} [options]   (bigrm COMMAND --help)", file=sys.stderr)
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])
