"""data.*: which rows are read and how they become scored token sequences (and the built-in tasks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypedDict, get_args

from bigrm.config.checks import bounds
from bigrm.errors import ConfigError


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
    task: Literal["ranked", "steps", "attributes", "length", "noisy"] = "ranked"
    """`ranked`: K reviews ranked by sentiment (bigrm.builtin.synthetic.make_rows). `steps`: stepwise rows for a process
    reward model, min_k..max_k solutions per prompt, each step correct until the first step with a word of the unwanted
    sentiment (bigrm.builtin.synthetic.make_step_rows). `attributes`: the multi-attribute task
    (bigrm.builtin.synthetic_attributes): num_train rated single-completion rows (one column per data.attributes name,
    some ratings missing) plus num_train / 4 K-ranked rows without ratings, ranked by the weighted sum of the ratings
    (loss.attribute_weights); eval rows are K-ranked and rated. Needs 1 to 3 data.attributes (any names). `length`: the
    length-biased pairs (bigrm.builtin.synthetic.make_length_rows), eval pairs length-balanced. `noisy`: the ranked
    task's pairs with a share of the training labels flipped (data.synthetic.noise;
    bigrm.builtin.synthetic.make_noisy_rows), eval pairs clean."""
    length_bias: float = 0.6
    """The length task: the fraction of training pairs whose better review is the shorter labelled the other way."""

    noise: float = 0.25
    """The noisy task: the fraction of training pairs whose labels are flipped (the worse completion preferred)."""

    def __post_init__(self) -> None:
        bounds(self, "data.synthetic", ("num_train",), ("num_eval", "length_bias", "noise"))
        for name in ("length_bias", "noise"):
            if getattr(self, name) > 1:
                raise ConfigError(f"data.synthetic.{name}: must be <= 1, got {getattr(self, name)}")
        if not 2 <= self.min_k <= self.max_k:
            raise ConfigError(f"data.synthetic: need 2 <= min_k <= max_k, got {self.min_k}, {self.max_k}")


RewardConvention = Literal["trl", "grpo", "openrlhf"]  # described in bigrm.data.sequences
REWARD_CONVENTIONS = get_args(RewardConvention)
StepLayout = Literal["trl", "joined"]  # described in bigrm.data.sequences


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
    trained and read at each step's last token, the separator's (as TRL's PRMTrainer). Exports record it."""
    step_layout: StepLayout = "trl"
    """Stepwise rows' tokens. `trl`: TRL PRMTrainer.tokenize_row's, what an RL loop that splits generated ids at the
    separator sees: BOS if the tokenizer has one, the prompt, then each step tokenised alone followed by the
    separator's ids; no EOS. `joined`: the reward convention's tokens of prompt + the joined solution text, what a
    pipeline on text sees (BPE may merge a separator with the text around it). Exports record it; `bigrm score`/`eval`
    follow the recorded one unless this option is given."""
    step_token: str = ""
    """Stepwise rows: a special token that follows every step in place of step_separator (as Qwen2.5-Math-PRM's
    `<extra_0>`); it is one id that never merges, so both layouts read the same token. Added to the tokenizer (and
    the embeddings grown) when missing; exports save it with the tokenizer. Empty: step_separator."""
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
    stream_chunk: int = 8192
    """Rows read, validated and tokenised at a time: the data is streamed through the builder this many rows at a
    time, so its memory is bounded by this, not by the data (stepwise files, and files other than JSON Lines, are
    read whole). How the tokens are built, not what they are: the same cache whatever its value."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The built-in task."""

    def __post_init__(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        bounds(self, "data", ("max_length", "max_errors", "step_group_size", "stream_chunk"), ("num_proc",))
        names = self.attributes
        if not all(names) or len(set(names)) != len(names):
            raise ConfigError(f"data.attributes: expected distinct column names, got {names!r}")
        columns = {getattr(self, f) for f in self.__dataclass_fields__ if f.endswith("_column")}
        clash = sorted(columns & set(names))
        if clash:
            raise ConfigError(f"data.attributes: {clash} also name(s) a data.*_column")
        span = self.attribute_range
        if span and not (len(span) == 2 and all(abs(b) < float("inf") for b in span) and span[0] < span[1]):
            raise ConfigError(f"data.attribute_range: expected [lo, hi] with lo < hi, finite, got {span!r}")
        if self.synthetic.task == "attributes" and not 1 <= len(names) <= 3 and not self.train_files:
            raise ConfigError("data.synthetic.task=attributes: name 1 to 3 attributes in data.attributes")
        if names and self.synthetic.task == "steps" and not self.train_files:
            raise ConfigError(STEPS_WITH_ATTRIBUTES)
