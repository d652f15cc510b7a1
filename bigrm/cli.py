"""Command-line entry points: `bigrm train | prepare | export | score | eval | merge | serve` (`launch/train.py` is
`bigrm train`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from bigrm import config, dist, options, precision
from bigrm.errors import BigrmError, ConfigError, make_directory
from bigrm.kinds import RewardKind
from bigrm.training import failures
from bigrm.training.preemption import EXIT_CODE, Preempted


def _run(fn, *args) -> int:
    try:
        code = fn(*args)
    except BigrmError as err:
        if dist.launched_rank() == 0:  # every rank meets the same bad input: one message, not one per rank
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr)
        return 130
    return code or 0


def train_main(argv: list[str] | None = None) -> int:
    """Train a reward model: --config FILE.yaml (default: the built-in tiny recipe), then --section.option overrides."""
    argv = sys.argv[1:] if argv is None else argv
    if _asks_help(argv):
        print(options.help_text())
        return 0

    def train() -> None:
        from bigrm.training.trainer import run

        run(options.from_argv(argv))

    try:
        train()
    except Preempted:  # the trainer has said where it stopped; launchers and slurm/train.sbatch act on the code
        return EXIT_CODE
    except Exception as err:  # the first failure of any rank is the one line every rank's exit reports
        return failures.report(err)
    return 0


def _sections(extra: list[str], allowed: tuple[str, ...], convention: str | None, kind: RewardKind) -> config.Config:
    """`--data.x value` (and for eval `--loss.x value`) options, as in training; `data.reward_convention` defaults to
    `convention`, the one the model records (it was trained to score that token), and the data options the model's
    kind reads its labels with to the kind's (kind.data_defaults: an attribute head's names)."""
    defaults = {"data.reward_convention": convention or config.DataConfig.reward_convention, **kind.data_defaults()}
    cfg = options.parse(extra, allowed, defaults)
    given = cfg.data.reward_convention
    if convention and given != convention:
        print(f"warning: scoring with data.reward_convention={given}; the model was trained with {convention}")
    recorded = " (recorded in the model)" if given == convention else ""
    print(f"rewards read as data.reward_convention={given}{recorded}")
    return cfg


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
    make_directory(Path(path), "--report")


def _required(p: ArgumentParser, flag: str, help: str, **kwargs) -> None:
    # no default at all (not jsonargparse's Unset): the help shows none, and a missing flag is an error
    p.add_argument(flag, required=True, default=argparse.SUPPRESS, help=help, **kwargs)


def _model_args(p: ArgumentParser) -> None:
    _required(p, "--model", "exported directory or a bigrm checkpoint (checkpoints/step-*)")
    _required(p, "--data", "rows in any training format (.jsonl, .json, .parquet, a dir)", metavar="FILE")
    p.add_argument("--max_tokens_per_batch", type=int, default=16384, help="token budget of one packed forward")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device")
    p.add_argument("--dtype", type=precision.Name, default="auto", help="auto: the dtype the model was saved in")
    p.add_argument("--attn_impl", type=config.AttnImpl, default="auto", help="as model.attn_impl in training")
    p.add_argument("--share_prompt", action="store_true", help="encode each prompt once (rewards unchanged)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _parser(prog: str, description: str) -> ArgumentParser:
    return ArgumentParser(prog=f"bigrm {prog}", description=description, exit_on_error=False, allow_abbrev=False)


def _asks_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


def _help(p: ArgumentParser, sections: tuple[str, ...] = ()) -> int:
    """The command's own options, then those of the training `sections` it takes."""
    print(p.format_help())
    if sections:
        keys = " and ".join(f"--{s}.KEY" for s in sections)
        print(f"{keys} VALUE options as in training (bare --KEY too); data.reward_convention defaults to the one the")
        print("model records, data.attributes to its attribute head's names:\n")
        print(options.parser(sections, add_help=False, usage=argparse.SUPPRESS).format_help())
    return 0


def _args(p: ArgumentParser, argv: list[str], sections: tuple[str, ...]) -> tuple[Namespace, list[str]]:
    """(the command's own options, the `sections`' options for _sections), each checked before any model loads."""
    rest, extra = options.split_sections(argv, sections)
    args = options.parse_args(p, rest)
    options.parse_args(options.parser(sections), extra)  # their defaults come from the model: only their types here
    return args, extra


def score_main(argv: list[str]) -> int:
    """Write each input row with `rewards` aligned with its completions."""
    p = _parser("score", score_main.__doc__)
    _model_args(p)
    _required(p, "--out", "output JSON Lines file")
    p.add_argument("--segments", action="store_true", help="reward every piece of completions given as lists")
    p.add_argument(
        "--separator",
        type=str | None,
        default=None,
        help="with --segments: split text completions after each SEPARATOR instead",
    )
    p.add_argument("--per-token", dest="per_token", action="store_true", help="value at every completion token")
    if _asks_help(argv):
        return _help(p, ("data",))

    def score() -> None:
        import torch

        from bigrm.inference import scoring

        args, extra = _args(p, argv, ("data",))
        writable(args.out, "--out")
        device = torch.device(args.device)
        model, tokenizer, convention, kind = scoring.load_model(args.model, device, args.dtype, args.attn_impl)
        segments = args.segments or args.separator is not None
        cfg = _sections(extra, ("data",), convention, kind)
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
    """Ranking metrics and reward diagnostics of a reward model on a labelled file."""
    p = _parser("eval", eval_main.__doc__)
    _model_args(p)
    p.add_argument("--out", type=str | None, default=None, help="also write the metrics to this JSON file")
    p.add_argument(
        "--report",
        type=str | None,
        default=None,
        metavar="DIR",
        help="also draw the eval there: PNG plots (calibration, reward histograms, reward vs length, accuracy by K "
        "and subset), report.md embedding them, report.json with the numbers drawn (needs bigrm[report])",
    )
    if _asks_help(argv):
        return _help(p, ("data", "loss"))

    def evaluate() -> None:
        import torch

        from bigrm.inference import scoring

        args, extra = _args(p, argv, ("data", "loss"))
        if args.out:
            writable(args.out, "--out")
        if args.report:
            report_dir(args.report)
        device = torch.device(args.device)
        model, tokenizer, convention, kind = scoring.load_model(args.model, device, args.dtype, args.attn_impl)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the metrics JSON alone
            cfg = _sections(extra, ("data", "loss"), convention, kind)
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
    """A training checkpoint → a verified plain Hugging Face classifier."""
    p = _parser("export", export_main.__doc__)
    _required(p, "--checkpoint", "a complete checkpoint directory (checkpoints/step-*)")
    _required(p, "--out", "directory to write")
    p.add_argument("--dtype", type=precision.Name, default="auto", help="auto: the training dtype")
    p.add_argument(
        "--merge-attributes",
        dest="merge_attributes",
        action="store_true",
        help="attribute heads (data.attributes): write the 1-logit model whose logit is the scalar reward "
        "Σ_a w_a v_a (loss.attribute_weights), the head's rows combined by the weights, for consumers that read one "
        "score (RewardBench, TRL, OpenRLHF)",
    )
    if _asks_help(argv):
        return _help(p)

    def do_export() -> None:
        from bigrm.artifacts.export import export_checkpoint

        args = options.parse_args(p, argv)
        path, out, dtype = Path(args.checkpoint), Path(args.out), precision.saved(args.dtype)
        rewards = export_checkpoint(path, out, dtype, args.merge_attributes)
        print(f"exported {args.checkpoint} → {args.out} (verified on {len(rewards)} held-out sequences)")

    return _run(do_export)


def merge_main(argv: list[str]) -> int:
    """Average exports (or extrapolate one from another, ExPO) into a verified export."""
    p = _parser(
        "merge", "Average exported reward models, or extrapolate from one to another (ExPO): a verified export."
    )
    _required(p, "--models", "exported directories of one architecture, tokenizer, convention and kind", nargs="+")
    _required(p, "--out", "directory to write")
    weights = "one positive weight per model, normalised to sum 1 (default: equal)"
    p.add_argument("--weights", type=float, nargs="+", default=argparse.SUPPRESS, help=weights)
    p.add_argument(
        "--alpha",
        type=float | None,
        default=None,
        help="ExPO instead of averaging: θ = θ_a + α(θ_a − θ_b) for --models A B (α = 0 writes A)",
    )
    if _asks_help(argv):
        return _help(p)

    def do_merge() -> None:
        from bigrm.artifacts.merge import merge

        args = options.parse_args(p, argv)
        record = merge([Path(m) for m in args.models], Path(args.out), args.get("weights"), args.alpha)
        terms = " + ".join(f"{c:g}·{m}" for c, m in zip(record["coefficients"], args.models, strict=True))
        print(f"merged {terms} → {args.out} (verified)")

    return _run(do_merge)


def prepare_main(argv: list[str]) -> int:
    """Fill the token cache ahead of training (same options as train)."""
    if _asks_help(argv):
        print(
            "Validate and tokenise the data of a training run into the token cache (data.cache_dir) ahead of time, "
            "with every core (data.num_proc), and print the report training prints. A training run with the same "
            "data options, tokenizer and files memory-maps it instead of tokenising. Takes the training options:\n\n"
            + options.help_text("bigrm prepare")
        )
        return 0

    def prepare() -> None:
        from bigrm.data.pipeline import prepare

        for line in prepare(options.from_argv(argv)).log:
            print(line)

    return _run(prepare)


def serve_main(argv: list[str]) -> int:
    """Serve the reward model over HTTP (OpenRLHF, vLLM pooling and bigrm's own endpoints)."""
    p = _parser("serve", "Serve the reward model over HTTP: OpenRLHF's /get_reward, vLLM's /classify and /pooling, "
                "bigrm's grouped /v1/rewards, /health and /metrics (README: Serving the reward model).")  # fmt: skip
    _required(p, "--model", "exported directory or a bigrm checkpoint (checkpoints/step-*)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api_key", type=str | None, default=None, help="required as `Authorization: Bearer KEY` or "
                   "`X-API-Key: KEY` on every endpoint but /health (default: $BIGRM_API_KEY; unset: none)")  # fmt: skip
    p.add_argument("--max_tokens_per_batch", type=int, default=16384, help="token budget of one packed forward")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device")
    p.add_argument("--devices", type=str | None, default=None, help="one server per device, comma-separated "
                   "(cuda:0,cuda:1; cpu,cpu), on consecutive ports from --port, behind a load balancer")  # fmt: skip
    p.add_argument("--dtype", type=precision.Name, default="auto", help="auto: the dtype the model was saved in")
    p.add_argument("--attn_impl", type=config.AttnImpl, default="auto", help="as model.attn_impl in training")
    p.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--normalize", action="store_true", help="rewards as (r - mean) / std, the export's statistics")
    p.add_argument("--max_body", type=int, default=16 << 20, help="bytes of one request body; more: 413")
    p.add_argument("--max_sequences", type=int, default=1024, help="sequences of one request; more: 413")
    p.add_argument("--max_queue", type=int, default=8192, help="sequences waiting to be scored; more: 503")
    p.add_argument("--batch_wait", type=float, default=0.002, help="seconds a batch waits for more requests")
    if _asks_help(argv):
        return _help(p, ("data",))

    def serve() -> int | None:
        import os

        import torch

        from bigrm.inference import replicas
        from bigrm.inference.rewarder import Rewarder
        from bigrm.inference.serve import ServeOptions, run

        args, extra = _args(p, argv, ("data",))
        if args.devices:
            devices = [d.strip() for d in args.devices.split(",") if d.strip()]
            if len(devices) < 2:
                raise ConfigError(f"--devices: give two or more, comma-separated (one: --device), got {args.devices!r}")
            last = args.port + len(devices) - 1
            print(f"bigrm serve: {len(devices)} replicas on ports {args.port}..{last}", flush=True)
            return replicas.run(argv, devices, args.port)
        if args.threads:
            torch.set_num_threads(args.threads)
        rewarder = Rewarder(args.model, args.device, args.dtype, args.attn_impl)
        cfg = _sections(extra, ("data",), rewarder.recorded, rewarder.kind)
        rewarder.configure(cfg.data, args.max_tokens_per_batch, args.normalize)
        key = args.api_key or os.environ.get("BIGRM_API_KEY") or None
        opts = ServeOptions(args.host, args.port, key, args.max_body, args.max_sequences, args.max_queue,
                            args.batch_wait, Path(args.model).name)  # fmt: skip
        print(f"bigrm serve: {rewarder.kind.name} reward model on http://{args.host}:{args.port}", flush=True)
        run(rewarder, opts)

    return _run(serve)


COMMANDS = {
    "train": train_main,
    "prepare": prepare_main,
    "export": export_main,
    "score": score_main,
    "eval": eval_main,
    "merge": merge_main,
    "serve": serve_main,
}


def main() -> int:
    """`bigrm COMMAND`; `bigrm --help` lists the commands (exit 0), no or an unknown command lists them (exit 2)."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        asked = len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help")
        listing = "".join(f"\n  {name:<9}{(run.__doc__ or '').splitlines()[0]}" for name, run in COMMANDS.items())
        usage = f"usage: bigrm {{{','.join(COMMANDS)}}} [options]   (bigrm COMMAND --help)\n\ncommands:{listing}"
        if not asked and len(sys.argv) >= 2:
            usage = f"bigrm: unknown command {sys.argv[1]!r}\n{usage}"
        print(usage, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])
