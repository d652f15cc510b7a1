"""Typed run configuration: one dataclass field per option, its type the values it takes, its docstring its help.

`python launch/train.py --help` prints every field's docstring, so this file is the single place an option is
defined and described; bigrm.options reads them from YAML recipes and `--key value` arguments (jsonargparse), which
check each value against its type (`Literal` choices included). What a type cannot say is checked in __post_init__.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypedDict, get_args

from bigrm import precision
from bigrm.errors import ConfigError


def _bounds(section: object, prefix: str, positive: tuple[str, ...], non_negative: tuple[str, ...] = ()) -> None:
    for key in (*positive, *non_negative):
        value, zero = getattr(section, key), key in non_negative
        if value < 0 or (value == 0 and not zero):
            raise ConfigError(f"{prefix}.{key}: must be {'>= 0' if zero else '> 0'}, got {value}")


@dataclass
class SyntheticConfig:
    """data.synthetic.*: the built-in task, trained on when data.train_files is empty."""

    num_train: int = 4000
    """Prompts in the built-in synthetic training set (used when data.train_files is empty)."""
    num_eval: int = 400
    """Prompts in the built-in synthetic eval set."""
    min_k: int = 2
    """Fewest completions per synthetic prompt."""
    max_k: int = 6
    """Most completions per synthetic prompt."""
    task: Literal["ranked", "steps", "attributes"] = "ranked"
    """`ranked`: K reviews ranked by sentiment (bigrm.builtin.synthetic.make_rows). `steps`: stepwise rows for a process
    reward model, min_k..max_k solutions per prompt, each step correct until the first step with a word of the unwanted
    sentiment (bigrm.builtin.synthetic.make_step_rows). `attributes`: the multi-attribute task
    (bigrm.builtin.synthetic_attributes): num_train rated single-completion rows (one column per data.attributes name,
    some ratings missing) plus num_train / 4 K-ranked rows without ratings, ranked by the weighted sum of the ratings
    (loss.attribute_weights); eval rows are K-ranked and rated. Needs 1 to 3 data.attributes (any names)."""

    def __post_init__(self) -> None:
        _bounds(self, "data.synthetic", ("num_train",), ("num_eval",))
        if not 2 <= self.min_k <= self.max_k:
            raise ConfigError(f"data.synthetic: need 2 <= min_k <= max_k, got {self.min_k}, {self.max_k}")


RewardConvention = Literal["trl", "grpo", "openrlhf"]  # described in bigrm.data.sequences
REWARD_CONVENTIONS = get_args(RewardConvention)
Sink = Literal["tensorboard", "wandb", "none"]  # where logged scalars go (train.report_to)


class _File(TypedDict):
    path: str


class WeightedFile(_File, total=False):
    """A data.train_files entry: {path, weight}, taking round(weight * rows) of the file's rows per epoch."""

    weight: float


STEPS_WITH_ATTRIBUTES = (
    "stepwise rows (process reward models) and data.attributes (several rating heads) cannot be trained in one run: "
    "a step is rated by one value; train them as separate models"
)


@dataclass
class DataConfig:
    """data.*: which rows are read and how they become scored token sequences."""

    train_files: list[str | WeightedFile] = field(default_factory=list)
    """Training files: paths (JSON, JSONL, optionally .gz, Parquet, or a `datasets.save_to_disk` directory) or {path,
    weight} mappings. A weight w takes round(w * rows) rows of that file per epoch (whole copies plus a seeded sample).
    Empty: the built-in synthetic K-ranked task."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files (same formats). Empty: see eval_fraction."""
    eval_fraction: float = 0.0
    """With no eval_files, the fraction of each training file's distinct prompts held out for eval (a seeded sample,
    train.seed): every row of a held-out prompt goes to eval, so no eval prompt is trained on."""
    prompt_column: str = "prompt"
    """Column holding the prompt (text, or a list of chat messages)."""
    ranked_column: str = "ranked_outputs"
    """Column holding K >= 2 completions ordered best to worst."""
    chosen_column: str = "chosen"
    """Column of the preferred completion in pairwise rows."""
    rejected_column: str = "rejected"
    """Column of the dispreferred completion in pairwise rows."""
    margin_column: str = "margin"
    """Optional numeric column: a margin m subtracted inside every pair's loss, -log s(r_i - r_j - m)."""
    completions_column: str = "completions"
    """Scored rows: the column of K >= 2 completions (any order)."""
    scores_column: str = "scores"
    """Scored rows: one number per completion, higher is better (see loss.scores)."""
    labels_column: str = "labels"
    """Stepwise rows (TRL's stepwise supervision: `completions` is one solution's list of steps): one label per step, a
    boolean or a probability in [0, 1] that the step is correct (kept as a float: soft labels)."""
    step_separator: str = "\n"
    """Stepwise rows: appended to every step, so the solution is step1 + sep + step2 + sep + ...; the value head is
    trained and read at each step's last token, the separator (as TRL's PRMTrainer). Exports record it."""
    step_group_size: int = 8
    """Stepwise rows with the same prompt (several solutions) form groups of up to this many solutions, in file order:
    train.share_prompt encodes the prompt once per group. They are never ranked against each other."""
    weight_column: str = "weight"
    """Optional positive number per row scaling that prompt's share of the loss."""
    attributes: list[str] = field(default_factory=list)
    """Names of per-completion rating columns (e.g. HelpSteer2's [helpfulness, correctness, coherence, complexity,
    verbosity]): the value head gets one output per name (bigrm.model.heads). Rated rows {prompt, response, <name>:
    number, ...} hold one completion; ranked, scored and pairwise rows may carry per-completion lists aligned with their
    completions ({..., helpfulness: [3, 1, null]}). A null or absent rating is masked, never read as 0. Empty: one
    scalar reward head."""
    attribute_range: list[float] = field(default_factory=list)
    """With data.attributes: [lo, hi], the range of every rating (e.g. [0, 4] for HelpSteer2); one outside it is
    that row's error. Empty: unchecked."""
    response_column: str = "response"
    """Rated rows (with data.attributes): the column of the row's single completion."""
    assistant_marker: str = "\n\nAssistant:"
    """Implicit-prompt text pairs: the prompt is the longest common prefix of chosen and rejected, cut just after the
    last occurrence of this marker in it (or the whole common prefix when the marker is absent)."""
    reward_convention: RewardConvention = "trl"
    """Which token carries the reward, to match the RM's consumer (it scores the same token). `trl`: text rows are
    tokenizer(prompt + completion) with the tokenizer's special tokens plus EOS; chat rows are the chat template's
    rendering as is (TRL RewardTrainer, TRL GRPO with chat prompts, RewardBench, apply_chat_template(...,
    tokenize=True)). `grpo`: text rows are prompt + completion with no special tokens and no EOS (TRL GRPO with text
    prompts); chat rows as `trl`. `openrlhf`: the text or rendering with trailing newlines stripped, plus ' ' + EOS
    unless it ends in EOS, no special tokens added (OpenRLHF). Exports record it; `bigrm score`/`eval` use the recorded
    one unless this option is given."""
    max_length: int = 1024
    """Most tokens in one scored sequence (prompt + completion + EOS)."""
    overlong: Literal["error", "skip"] = "error"
    """When a completion alone (with its EOS) exceeds max_length: `error` stops before training, `skip` drops the row
    and counts it. Long prompts are always cut from the left and counted."""
    skip_invalid: bool = False
    """Skip invalid rows (counted and reported by reason) instead of stopping."""
    max_errors: int = 20
    """Most row errors listed when stopping on invalid data."""
    cache: bool = True
    """Keep the tokenised data in cache_dir, keyed by the files' contents, the tokenizer and every data option: a later
    run, every rank and a resumed job memory-map it instead of tokenising again (one process per machine builds it while
    the others wait, outside any collective). `bigrm prepare` builds it ahead of time."""
    cache_dir: str = ""
    """Where the token cache lives (one directory per key; delete them to reclaim space). Empty: $BIGRM_CACHE_DIR, else
    ~/.cache/bigrm/tokens. On a filesystem shared by the nodes, the first to get there builds for all."""
    num_proc: int = 0
    """Processes that validate and tokenise the rows. 0: every core this process may use."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The built-in task."""

    def __post_init__(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        _bounds(self, "data", ("max_length", "max_errors", "step_group_size"), ("num_proc",))
        names = self.attributes
        if not all(names) or len(set(names)) != len(names):
            raise ConfigError(f"data.attributes: expected distinct column names, got {names!r}")
        columns = {getattr(self, f) for f in self.__dataclass_fields__ if f.endswith("_column")}
        clash = sorted(columns & set(names))
        if clash:
            raise ConfigError(f"data.attributes: {clash} also name(s) a data.*_column")
        bounds = self.attribute_range
        if bounds and not (len(bounds) == 2 and all(abs(b) < float("inf") for b in bounds) and bounds[0] < bounds[1]):
            raise ConfigError(f"data.attribute_range: expected [lo, hi] with lo < hi, finite, got {bounds!r}")
        if self.synthetic.task == "attributes" and not 1 <= len(names) <= 3 and not self.train_files:
            raise ConfigError("data.synthetic.task=attributes: name 1 to 3 attributes in data.attributes")
        if names and self.synthetic.task == "steps" and not self.train_files:
            raise ConfigError(STEPS_WITH_ATTRIBUTES)


AttnImpl = Literal["auto", "sdpa", "eager", "varlen", "flash_attn", "flex"]
ATTN_IMPLS = get_args(AttnImpl)


@dataclass
class ModelConfig:
    """model.*: the backbone and how it runs."""

    path: str = ""
    """A local Hugging Face model directory (weights, config, tokenizer). Empty: the built-in tiny Llama,
    random-initialised from bigrm/assets/tiny-llama.json with a locally built tokenizer."""
    attn_impl: AttnImpl = "auto"
    """Attention over packed rows, never across segments. `auto`: on CUDA `flash_attn` when flash-attn is installed,
    else `varlen` (torch.nn.attention.varlen, torch >= 2.10, sm80+), else `flex` (FlexAttention with a block-sparse
    mask); on CPU `sdpa`: per micro-batch the cheaper of the segments as rows of a padded batch and the packed row under
    a block-diagonal causal mask. `eager`: that mask with the model's plain attention. `varlen`, `flash_attn` and `flex`
    need CUDA. Every backend honours the model's sliding windows; soft-capped attention logits (Gemma-2) need `eager`,
    `flash_attn` or `flex`, which `auto` then picks; a backend that cannot compute what the model asks is refused at
    start-up."""
    dtype: precision.Name = "auto"
    """Weights and compute dtype: `auto` (bf16 on CUDA, fp32 on CPU), `bf16` or `fp32`."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile each transformer block (dynamic shapes): fuses norms, rotary and activations. The first steps pay
    the compilation."""
    random_init: bool = False
    """Initialise weights randomly from the config at model.path instead of loading its weights."""


@dataclass
class LoraConfig:
    """lora.*: low-rank adapters on a frozen backbone."""

    r: int = 0
    """LoRA rank. 0: train every weight of the backbone. > 0: freeze the backbone and train rank-r adapters on
    lora.target_modules; the value head is always trained fully and saved."""
    alpha: float = 16.0
    """LoRA scale numerator: adapter updates are scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=list)
    """Names of the backbone's linear layers that get adapters (the last part of the module name, e.g. [q_proj,
    v_proj]). Empty: every linear layer of the backbone."""
    train_embeddings: bool = False
    """With LoRA, also train the input token embeddings fully (saved with it)."""

    def __post_init__(self) -> None:
        _bounds(self, "lora", ("alpha",), ("r",))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not all(self.target_modules):
            raise ConfigError(f"lora.target_modules: expected a list of module names, got {self.target_modules!r}")


@dataclass
class QuantizationConfig:
    """quantization.*: a quantised frozen backbone (QLoRA)."""

    bits: Literal[0, 4, 8] = 0
    """Load the frozen backbone quantised by bitsandbytes: 4 (QLoRA) or 8 (LLM.int8); 0: not quantised. Needs lora.r >
    0. Exports merge the adapters into the de-quantised weights in model.dtype."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (normal float, the QLoRA default) or fp4."""
    double_quant: bool = True
    """4-bit: quantise the per-block scales too (about 0.37 bits per weight saved)."""


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

    def __post_init__(self) -> None:
        coefs = ("attribute_coef", "score_margin_scale", "regress_weight", "tie_coef", "center_rewards_coef")
        _bounds(self, "loss", ("tie_threshold",), (*coefs, "l2_rewards_coef", "step_coef"))


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
        positive = ("epochs", "max_tokens_per_batch", "micro_batches_per_step", "packing_window", "lr", "log_every")
        zero_ok = ("max_steps", "eval_every", "weight_decay", "grad_clip", "save_every", "keep_checkpoints")
        _bounds(self, "train", (*positive, "max_nonfinite_steps"), (*zero_ok, "peak_tflops", "max_loss_ratio"))
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.warmup_ratio must be in [0, 1) and train.min_lr_ratio in [0, 1]")
        sinks = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        self.report_to = [] if sinks == ["none"] else sinks
        if "none" in self.report_to:
            raise ConfigError(f"train.report_to: `none` stands alone, not in a list of trackers: {sinks}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas: need two numbers, got {self.adam_betas}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.quantization.bits and not self.lora.r:
            raise ConfigError("quantization.bits: a quantised backbone cannot be trained; set lora.r > 0 (QLoRA)")
        weights, names = self.loss.attribute_weights, self.data.attributes
        if weights and len(weights) != len(names):
            raise ConfigError(
                f"loss.attribute_weights: {len(weights)} weight(s) for {len(names)} data.attributes; give one per "
                "attribute, or none for their mean"
            )


def attribute_weights(names: list[str], loss: LossConfig) -> tuple[float, ...]:
    """The weights of the scalar reward of an attribute head over `names` (data.attributes): loss.attribute_weights,
    or 1 each (the sum) when empty."""
    return tuple(float(w) for w in loss.attribute_weights) or (1.0,) * len(names)
