"""A trained reward model → rewards for the rows of a file (`bigrm score`, `bigrm eval`).

Rows go through the same validation and the same batched tokenising as training (bigrm.data.tokenise.scored_chunk),
are packed under a token budget and forwarded without padding. Parts of a completion can be scored too:
  segments   a completion given as a list of pieces (["step 1 ...", "step 2 ..."]) or split at a separator string
             is rewarded at the end of every piece: the value at the last token that ends at or before the piece's
             end (the final piece's value is the completion's reward, read at the scored sequence's last token);
  per token  the value head's output at every completion token (with what the reward convention appends).
Stepwise rows (a process reward model's data) get `step_rewards`: per completion, σ(value) at each step's end, the
probability that the step is correct (what the export's token classifier gives as LABEL_1's score there).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from bigrm import precision, progress
from bigrm.artifacts import checkpoint, export
from bigrm.config import DataConfig, LossConfig
from bigrm.data.examples import Example, RowError
from bigrm.data.formats import FORMATS
from bigrm.data.packing import SegmentLabels, check_budget, collate, layout_tokens, pack_bins
from bigrm.data.rows import RowFile, listed, read_file, standardise_scores
from bigrm.data.sequences import EncodeReport, Group, Scored
from bigrm.data.tokenise import CHUNK, TOKENISE, scored_chunk
from bigrm.data.tokenizer import check_step_token, prepare_tokenizer
from bigrm.errors import DataError, ExportError
from bigrm.kinds import RewardKind, for_model
from bigrm.model.attention import hf_attn_implementation, read_attention_needs, resolve_attn
from bigrm.model.reward_model import RewardModel


def load_model(path: str, device: torch.device, dtype: str = "auto", attn: str = "auto"):
    """(RewardModel in eval mode, tokenizer, the reward convention it was trained with or None if unrecorded, its
    reward kind) from an exported directory or a bigrm training checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    torch_dtype = precision.saved(dtype)
    p = Path(path)
    if not p.is_dir():  # never a hub name: bigrm scores local directories
        raise ExportError(f"--model {path}: no such directory (an exported model or a bigrm checkpoint)")
    # a backend the model needs and the device lacks, or a model bigrm cannot run: refused before loading weights
    from_checkpoint = checkpoint.is_complete(p)
    if not from_checkpoint:
        export.check_export(p)
    config_dir = p / "hf" if from_checkpoint else p
    attn = resolve_attn(attn, device.type == "cuda", read_attention_needs(str(config_dir)))
    kind = for_model(AutoConfig.from_pretrained(config_dir))
    if from_checkpoint:
        classifier, tokenizer, convention = export.classifier_from_checkpoint(p, torch_dtype)
        classifier.config._attn_implementation = hf_attn_implementation(attn)
    else:
        tokenizer = AutoTokenizer.from_pretrained(p)
        prepare_tokenizer(tokenizer)
        with progress.transformers_bars():
            try:
                classifier = kind.load_export(p, torch_dtype or "auto", attn, tokenizer)
            except SafetensorError as err:  # a damaged plain Hugging Face directory (bigrm's are checked above)
                raise ExportError(f"{p}: cannot read its weights ({err})") from None
        convention = getattr(classifier.config, export.CONVENTION_KEY, None)
    return kind.reward_model(classifier.to(device).eval(), attn), tokenizer, convention, kind


def kind_for_rows(model: RewardModel, results: list[RowResult]) -> RewardKind:
    """The model's kind for these rows: stepwise rows are scored at each step's end by any one-output model."""
    return for_model(model.classifier.config, stepwise_rows=any(r.steps is not None for r in results))


SKIPPED_LISTED = 100  # rows skipped (data.skip_invalid, overlong: skip) listed with their reason in bigrm eval


@dataclass
class RowResult:
    row: dict
    example: Example | None = None
    scored: list[Scored] = field(default_factory=list)
    boundaries: list[list[int]] | None = None  # per completion, piece ends as character offsets in the completion
    error: str | None = None
    rewards: list[float] | None = None
    values: list | None = None  # per completion, the head's output (attribute heads: its A outputs)
    token_values: list[np.ndarray] | None = None  # per completion, the value at every token of its sequence
    steps: list[np.ndarray] | None = None  # stepwise rows: per completion, its step ends' token indices
    step_values: list[list[float]] | None = None  # stepwise rows: per completion, the value at each step end


def _pieces(value, name: str) -> tuple[str, list[int]] | str:
    if not (isinstance(value, list) and value and all(isinstance(p, str) and p for p in value)):
        return f"field {name!r}: with --segments a completion is a non-empty list of non-empty text pieces"
    return "".join(value), list(np.cumsum([len(p) for p in value]))


def _split_pieces(row: dict, fmt: str, cfg: DataConfig) -> tuple[dict, list[list[int]]] | str:
    """The row with each list-of-pieces completion joined, and the pieces' end offsets."""
    cols = FORMATS[fmt].piece_columns(cfg)
    if isinstance(cols, str):
        return cols
    row, bounds = dict(row), []
    for col, many in cols:
        values = row.get(col) if many else [row.get(col)]
        if not isinstance(values, list):
            return f"field {col!r}: missing"
        joined = []
        for value in values:
            piece = _pieces(value, col)
            if isinstance(piece, str):
                return piece
            joined.append(piece[0])
            bounds.append(piece[1])
        row[col] = joined if many else joined[0]
    return row, bounds


def _separator_bounds(completion: str, separator: str) -> list[int]:
    """Piece ends after each separator that closes a non-empty piece; the completion's end closes the last."""
    ends, start, at = [], 0, completion.find(separator)
    while at >= 0:
        end = at + len(separator)
        if at > start and end < len(completion):
            ends.append(end)
        start = end
        at = completion.find(separator, end)
    return ends + [len(completion)]


def prepare(path: str, cfg: DataConfig, tokenizer, segments: bool = False, separator: str | None = None):
    """Every row of the file with its validated example and scored sequences, or the reason it has none.

    Invalid rows stop the run with all errors listed unless cfg.skip_invalid; over-long completions follow
    cfg.overlong. Skipped rows stay in the output with their reason."""
    check_step_token(tokenizer, cfg.step_token)
    file = read_file(path, cfg)
    results, stops, todo = [], [], []  # stops: per row, whether its error stops the run (unless skip_invalid)
    for i, row in enumerate(progress.each(file.rows, f"read {Path(path).name}", unit="row")):
        results.append(RowResult(row if isinstance(row, dict) else {"row": row}))
        stops.append(True)
        parsed = _parsed(row, i, file, cfg, segments and not separator)
        if isinstance(parsed, str):
            results[i].error = parsed
        else:
            todo.append((i, *parsed))
    # training's batched tokenising, token ends read only where segments (or steps) are located
    for lo in progress.each(range(0, len(todo), CHUNK), *TOKENISE):
        chunk = todo[lo : lo + CHUNK]
        examples = [parsed for _, parsed, _ in chunk]
        scored = scored_chunk(examples, tokenizer, cfg.max_length, cfg.reward_convention, with_ends=segments)
        for (i, parsed, bounds), seqs in zip(chunk, scored, strict=True):
            result = results[i]
            stops[i] = _take_sequences(result, parsed, seqs, cfg)
            if result.error:
                continue
            result.example = parsed
            if segments:
                texts = [c if isinstance(c, str) else c[-1]["content"] for c in parsed.completions]
                result.boundaries = bounds if bounds is not None else [_separator_bounds(t, separator) for t in texts]
    done = [r for r in results if r.example is not None]
    for r, example in zip(done, standardise_scores([r.example for r in done]), strict=True):
        r.example = example  # regression targets over the file's scores, exactly as training computes them
    errors = [r.error for r, stop in zip(results, stops, strict=True) if r.error and stop]
    if errors and not cfg.skip_invalid:
        raise DataError(
            f"{len(errors)} row(s) cannot be scored (see skip_invalid / overlong):{listed(errors, cfg.max_errors)}"
        )
    return results


def _parsed(row, i: int, file: RowFile, cfg: DataConfig, pieces: bool) -> tuple[Example, list[list[int]] | None] | str:
    """The row's validated example with, for completions given as `pieces`, the pieces' ends; or why it has none."""
    bounds = None
    if pieces and isinstance(row, dict):
        split = _split_pieces(row, file.fmt, cfg)
        if isinstance(split, str):
            return f"{file.locate(i)}: {split}"
        row, bounds = split
    parsed = file.parse(i, cfg, row)
    return str(parsed) if isinstance(parsed, RowError) else (parsed, bounds)


def _take_sequences(result: RowResult, parsed: Example, seqs: list[Scored | int], cfg: DataConfig) -> bool:
    """Fill result.scored (and result.steps) with each completion's scored sequence, or set result.error: a
    completion longer than max_length or unusable steps; whether that error stops the run (steps: always, an
    over-long completion: per data.overlong)."""
    for k, scored in enumerate(seqs):
        if isinstance(scored, int):
            result.error = f"{parsed.source}: completion {k}: {scored} tokens, longer than max_length"
            return cfg.overlong == "error"
        result.scored.append(scored)
        if isinstance(scored.steps, str):
            result.error = f"{parsed.source}: completion {k}: {scored.steps}"
            return True
        if scored.steps is not None:
            result.steps = [*(result.steps or []), scored.steps]
    return True


def cut_summary(results: list[RowResult]) -> str:
    """How many scored sequences lost prompt tokens to data.max_length, as training reports it."""
    cut = [s.cut for r in results if r.example is not None for s in r.scored]
    return EncodeReport(prompts_cut=sum(c > 0 for c in cut), prompt_tokens_cut=sum(cut)).cut_summary()


@torch.no_grad()
def score(
    model: RewardModel,
    results: list[RowResult],
    budget: int,
    device: torch.device,
    every_token: bool,
    share_prompt: bool = False,
    kind: RewardKind | None = None,
) -> None:
    """Fill `rewards`, `values` (and `token_values`) of every scorable row, packed under a token budget: the rewards
    (and per-token values) are the kind's reward (attribute heads: the scalar), `values` the head's outputs."""
    share_prompt = share_prompt and not every_token  # per-token values need every sequence laid out whole
    todo = [r for r in results if r.example is not None]
    groups = [
        Group(
            tuple(np.asarray(s.ids, dtype=np.int64) for s in r.scored),
            r.example.source,
            steps=tuple(r.steps) if r.steps is not None else None,
            starts=tuple(s.completion_start for s in r.scored),
        )
        for r in todo
    ]
    check_budget(groups, budget, share_prompt)
    sizes = [layout_tokens(g, share_prompt) for g in groups]
    kind = kind or for_model(model.classifier.config)
    counter = progress.bar(len(groups), "score", unit="row")
    for mb in pack_bins(list(range(len(groups))), sizes, budget, window=max(len(groups), 1)):
        batch = collate([groups[i] for i in mb], pad_id=0, share_prompt=share_prompt).to(device)
        if every_token:
            values = model(batch, every_token=True).cpu()  # (T,); attribute heads (T, A)
            outputs = values[batch.read_index.cpu()]
            values = kind.rewards(values)
            cu = batch.cu_seqlens.cpu().tolist()
            segs = [values[cu[j] : cu[j + 1]].numpy() for j in range(len(cu) - 1)]
        else:
            outputs, segs = model(batch).cpu(), None
        # (N + P,) rewards, then values at step ends; attribute heads: (N, A) outputs, their scalar the reward
        rewards = kind.rewards(outputs)
        at, step_at = 0, len(batch.last_index)
        for i in mb:
            k = len(groups[i].seqs)
            todo[i].rewards = rewards[at : at + k].tolist()
            todo[i].values = outputs[at : at + k].tolist()
            todo[i].token_values = segs[at : at + k] if segs else None
            if groups[i].steps is not None:
                todo[i].step_values = []
                for ends in groups[i].steps:
                    todo[i].step_values.append(rewards[step_at : step_at + len(ends)].tolist())
                    step_at += len(ends)
            at += k
        counter.update(len(mb))
    counter.close()


def segment_rewards(scored: Scored, values: np.ndarray, bounds: list[int], completion: str) -> list[float]:
    """The value at the last token ending at or before each piece end; the last piece gets the reward."""
    base = scored.text.find(completion, scored.char_start)
    out = []
    for b in bounds[:-1]:
        idx = bisect.bisect_right(scored.ends, base + b) - 1
        out.append(float(values[max(idx, scored.completion_start)]))
    return out + [float(values[len(scored.ids) - 1])]


def output_row(result: RowResult, segments: bool, per_token: bool, kind: RewardKind) -> dict:
    """The input row with `rewards` (attribute heads: the scalar reward) and what the kind adds (kind.score_fields:
    attribute heads' `attributes`, a process reward model's `step_rewards`)."""
    row = dict(result.row)
    row["rewards"] = result.rewards
    row.update(kind.score_fields(result.values, result.step_values))
    if result.error:
        row["error"] = result.error
        return row
    if segments:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in result.example.completions]
        row["segment_rewards"] = [
            segment_rewards(s, v, b, t)
            for s, v, b, t in zip(result.scored, result.token_values, result.boundaries, texts, strict=True)
        ]
    if per_token:
        row["per_token_rewards"] = [
            v[s.completion_start :].tolist() for s, v in zip(result.scored, result.token_values, strict=True)
        ]
        row["per_token_ids"] = [s.ids[s.completion_start :] for s in result.scored]
    return row


def report(results: list[RowResult], cfg: LossConfig, kind: RewardKind, report_dir: Path | None = None) -> dict:
    """`bigrm eval`'s metrics over the scored rows (see bigrm.evaluation.diagnostics): the ranking ones of the reward
    (attribute heads: of the scalar reward) when the rows are ranked, then the kind's (kind.eval_metrics: a process
    reward model's step metrics, an attribute head's per-attribute ones); with report_dir, also drawn there
    (bigrm.evaluation.report), subsets by the rows' `subset`, else by their file."""
    done = [r for r in results if r.rewards is not None]
    if not done:
        raise DataError("no row could be scored")
    examples = [r.example for r in done]
    lengths = [len(s.ids) - s.completion_start for r in done for s in r.scored]
    labels = SegmentLabels.of(
        [e.labels for e in examples], [len(e.completions) for e in examples], torch.float64, lengths
    )
    if any(e.labels.ranked for e in examples):
        out, drawn = _ranking_report(done, labels, cfg)
    elif report_dir is not None:
        raise DataError("--report draws rankings; a stepwise file has none (its step metrics are printed)")
    else:
        out, drawn = {}, None
    outputs = torch.tensor([v for r in done for v in r.values], dtype=torch.float64)  # as the model lays them out:
    at_steps = [x for r in done for v in r.step_values or [] for x in v]  # every completion, then every step end
    if at_steps:
        outputs = torch.cat([outputs, torch.tensor(at_steps, dtype=torch.float64)])
    out.update(kind.eval_metrics([kind.eval_part(outputs, labels)]))
    out["num_rows_skipped"] = len(results) - len(done)
    reasons = [r.error for r in results if r.rewards is None and r.error]
    out["skipped"] = reasons[:SKIPPED_LISTED] + (
        [f"... and {len(reasons) - SKIPPED_LISTED} more"] if len(reasons) > SKIPPED_LISTED else []
    )
    if report_dir is not None:
        from bigrm.evaluation import report as eval_report

        eval_report.write(report_dir, out, *drawn)
    return out


def _ranking_report(done: list[RowResult], labels: SegmentLabels, cfg: LossConfig) -> tuple[dict, tuple]:
    """(metrics, what eval_report draws them from: rewards, labels, lengths and subset names)."""
    from bigrm.evaluation.diagnostics import ranking_report
    from bigrm.evaluation.report import source_file

    examples = [r.example for r in done]
    subsets = [r.row.get("subset") for r in done]
    rewards = torch.tensor([x for r in done for x in r.rewards], dtype=torch.float64)  # (N,)
    lengths = labels.seg_length  # (N,)
    named = any(s is not None for s in subsets)
    out = ranking_report(rewards, labels, lengths, cfg, subsets=[str(s) for s in subsets] if named else None)
    names = [str(s) if s is not None else source_file(e.source) for s, e in zip(subsets, examples, strict=True)]
    return out, (rewards, labels, lengths, names)
