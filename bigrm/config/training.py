"""loss.* and train.*: the objective, and optimisation, DeepSpeed, checkpoints, logging and export."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bigrm.config.checks import bounds
from bigrm.errors import ConfigError

Sink = Literal["tensorboard", "wandb", "none"]  # where logged scalars go (train.report_to)


LENGTH_COEFS = ("length_coef", "orthogonal_coef")


@dataclass
class LossConfig:
    """loss.*: the training objective (and the loss eval reports)."""

    objective: Literal["pairwise", "listmle"] = "pairwise"
    """`pairwise`: -log s(r_i - r_j - m_ij) over pairs i ranked above j. `listmle`: Plackett-Luce likelihood of the
    ranking, one term per completion, -r_i + log sum over completions ranked no better than i of exp(r_j) (tied
    completions share a risk set, as in Breslow's method)."""
    pair_weighting: Literal["per_prompt", "per_pair"] = "per_prompt"
    """`per_prompt`: each prompt's ranking loss is the mean over its pairs (listmle: its completions), then prompts are
    averaged, so every prompt weighs the same whatever its K. `per_pair`: every pair (completion) of the optimizer step
    weighs the same, so prompts with larger K weigh more."""
    scores: Literal["rank", "regress", "both"] = "rank"
    """Scored rows: `rank` orders completions by score (equal scores are ties); `regress` fits the reward to the score
    standardised over its file (mean 0, std 1) with a squared error; `both` adds the two."""
    score_margin_scale: float = 0.0
    """Scored rows in rank mode: margin m_ij = scale * (s_i - s_j) inside each pair (Llama 2's margin loss)."""
    regress_weight: float = 1.0
    """Weight of the squared-error term for scored rows (regress and both modes)."""
    tie_coef: float = 0.0
    """Pulls tied completions together: adds coef * mean over tied pairs of (r_i - r_j)^2 to the prompt's loss."""
    tie_threshold: float = 0.1
    """Eval: a tied pair counts as correct in tie_accuracy when |r_i - r_j| < this."""
    center_rewards_coef: float = 0.0
    """TRL's center_rewards_coefficient: adds coef * mean over the prompt's pairs of (r_i + r_j)^2 (for pairs exactly
    TRL's term), keeping rewards centred on zero."""
    l2_rewards_coef: float = 0.0
    """Adds coef * mean over the prompt's completions of r^2."""
    attribute_weights: list[float] = field(default_factory=list)
    """With data.attributes: the weights w_a of the scalar reward r = sum_a w_a * v_a (v_a: the head's output for
    attribute a, on the scale of loss.attribute_targets), one per attribute in data.attributes' order. The ranking loss,
    ranking metrics and `bigrm export --merge-attributes` use r. Empty: 1 each, the sum. The ranking loss sets the scale
    of r (a mean, with its smaller spread, pulls the outputs past their targets)."""
    attribute_targets: Literal["standardised", "raw"] = "standardised"
    """With data.attributes: what each output regresses to. `standardised`: the rating minus the mean over the training
    data's present ratings of that attribute, divided by their std (recorded in the export, so `bigrm score` reports
    ratings on their own scale). `raw`: the rating as given."""
    attribute_coef: float = 1.0
    """With data.attributes: weight of the rating term, the mean over attributes of each attribute's masked squared
    error, sum over present ratings of w_g (v - t)^2 / sum of w_g over them (w_g: the row's weight), both sums over the
    optimizer step. It is added to the ranking loss."""
    step_coef: float = 1.0
    """Stepwise rows (process reward models): the loss is ranking loss + step_coef * step loss, where the step loss is
    the binary cross-entropy of σ(value at each step's end) against the step's label (soft labels exact), weighted by
    its row's weight and averaged over the optimizer step's steps (see bigrm.objectives.steps)."""
    train_on_last_step_only: bool = False
    """Stepwise rows: train on each solution's last step only (TRL's option); eval still reads every step."""
    length_head: bool = False
    """ODIN (arXiv 2402.07319, bigrm.kinds.length): quality and length outputs, their sum ranked; the reward and the
    export are the quality output. Ranked rows only."""
    length_coef: float = 1.0
    """With loss.length_head: weight of |ρ(r_Q, L)| - ρ(r_L, L), Pearson correlations over a micro-batch of the two
    outputs with L, completion length in tokens."""
    orthogonal_coef: float = 1.0
    """With loss.length_head: weight of |w_Q · w_L|, the dot product of the quality and length head rows."""

    ensemble: int = 0
    """Members of an ensemble reward model (bigrm.kinds.ensemble; 0: none, else at least 2): one LoRA adapter set and
    one head row per member, trained in one run on bootstrap weights of the prompts, the loss the sum of the members'
    ranking losses. Needs lora.r; ranked rows only."""
    ensemble_bootstrap: bool = True
    """With loss.ensemble: weigh each prompt in each member's loss by a Poisson(1) draw fixed by the member and the
    prompt's source (file and line): each member sees its own bootstrap sample of the data."""
    ensemble_reward: Literal["mean", "min", "conservative"] = "mean"
    """With loss.ensemble: the aggregation the model's reward is (recorded in its export): the members' mean, their
    minimum, or the conservative mean - loss.ensemble_lambda * std. Scoring returns all of them."""
    ensemble_lambda: float = 1.0
    """With loss.ensemble: λ of the conservative reward mean - λ·std (std over the members, ddof 0)."""

    def __post_init__(self) -> None:
        if self.ensemble == 1 or self.ensemble < 0:
            raise ConfigError(f"loss.ensemble: members, 0 (none) or at least 2, got {self.ensemble}")
        coefs = ("attribute_coef", "score_margin_scale", "regress_weight", "tie_coef", "center_rewards_coef")
        bounds(
            self, "loss", ("tie_threshold",), (*coefs, "l2_rewards_coef", "step_coef", *LENGTH_COEFS, "ensemble_lambda")
        )


@dataclass
class TrainConfig:
    """train.*: optimisation, DeepSpeed, checkpoints, logging and export."""

    output_dir: str = "outputs/run"
    """Where config.yaml, log.jsonl, tensorboard/, checkpoints/, metrics.json, eval_report/ and final/ go."""
    deepspeed_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON. Keys set to "auto" are filled from this config; a fixed value that contradicts it is an error.
    Relative paths resolve against the working directory, then the repository root."""
    seed: int = 42
    """Seed for weights created here, data order and packing."""
    epochs: int = 1
    """Passes over the training data."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    max_tokens_per_batch: int = 8192
    """Token budget of one packed micro-batch; all K completions of a prompt share one micro-batch."""
    micro_batches_per_step: int = 1
    """Micro-batches per rank per optimizer step (gradient accumulation)."""
    sequence_parallel: int = 1
    """Ranks per sequence-parallel group (DeepSpeed Ulysses): N consecutive ranks share each packed micro-batch, each
    embedding 1/N of it along the sequence, and exchange attention heads (all-to-all) so attention sees the whole row,
    its segments and shared prompts intact. max_tokens_per_batch is then the group's budget: one completion may be N
    times longer than one rank could hold. Data parallel over world / N groups. N must divide the world size and the
    model's attention and key/value heads. 1: off."""
    share_prompt: bool = False
    """Encode each prompt once for its K completions: the longest common token prefix of a group's scored sequences is
    laid out once, each completion's remaining tokens attend to it and to themselves (never to a sibling), with
    positions continuing from it. Rewards and gradients are unchanged; shared tokens count once against
    max_tokens_per_batch."""
    packing_window: int = 1024
    """Prompts sorted together when packing (first-fit decreasing inside each shuffled window)."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    warmup_ratio: float = 0.03
    """Fraction of steps of linear warm-up."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0: off)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    log_every: int = 10
    """Log training loss, tokens/s and packing figures every N steps."""
    save_every: int = 0
    """Save a DeepSpeed checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest N complete checkpoints (0: keep all)."""
    resume: str = ""
    """Resume from a checkpoint directory, or `auto`: the newest complete one in <output_dir>/checkpoints (a fresh start
    if there is none). Weights, optimizer, scheduler, RNG and data position continue exactly."""
    resume_override: list[str] = field(default_factory=list)
    """Options (`section.option`, e.g. [train.lr]) a resume may change from the checkpoint's, logged and recorded in
    log.jsonl; any other change to the optimizer, schedule, loss, model, LoRA or quantization refuses the resume."""
    max_nonfinite_steps: int = 3
    """Stop the run (exit code 2, no export) after this many consecutive optimizer steps whose loss or gradient norm is
    not finite; such steps are never saved. fp16 loss-scale skips with a finite loss do not count."""
    max_loss_ratio: float = 0.0
    """Stop the run (exit code 2, no export) when a logged training loss exceeds this many times the first one logged
    (since the start or resume). 0: never; above 4× for 2 logged windows in a row is warned once either way."""
    overwrite_output_dir: bool = False
    """Delete the complete checkpoints of another run found in <output_dir>/checkpoints before training. Without it such
    a run is refused (continue it with `resume: auto`, or choose a new output_dir)."""
    report_to: list[Sink] | Sink = field(default_factory=lambda: ["tensorboard"])
    """Where logged scalars go besides the console and <output_dir>/log.jsonl (always written), as in transformers:
    `tensorboard` (<output_dir>/tensorboard), `wandb` (Weights & Biases: `pip install bigrm[wandb]`), a list of both, or
    `none`. W&B: rank 0 logs every scalar under `train/` and `eval/` against `train/global_step`, the resolved config
    once and the setup figures; WANDB_PROJECT (default bigrm), WANDB_ENTITY, WANDB_MODE (offline) and WANDB_DIR (default
    output_dir) are honoured; a resumed run continues the same W&B run, whose id is kept in <output_dir>/wandb_run_id.
    """
    run_name: str = ""
    """The run's name in the trackers that name runs (W&B). Empty: train.output_dir."""
    export: bool = True
    """Write <output_dir>/final as a plain Hugging Face sequence classifier at the end."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one accelerator, for the logged `mfu`. 0: the bf16 peak of a known GPU (H100, H200, A100,
    ...) when training in bf16; otherwise only `tflops_per_gpu` is logged."""

    def __post_init__(self) -> None:
        positive = ("epochs", "max_tokens_per_batch", "micro_batches_per_step", "sequence_parallel", "packing_window")
        positive += ("lr", "log_every")
        zero_ok = ("max_steps", "eval_every", "weight_decay", "grad_clip", "save_every", "keep_checkpoints")
        bounds(self, "train", (*positive, "max_nonfinite_steps"), (*zero_ok, "peak_tflops", "max_loss_ratio"))
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.warmup_ratio must be in [0, 1) and train.min_lr_ratio in [0, 1]")
        sinks = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        self.report_to = [] if sinks == ["none"] else sinks
        if "none" in self.report_to:
            raise ConfigError(f"train.report_to: `none` stands alone, not in a list of trackers: {sinks}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas: need two numbers, got {self.adam_betas}")
