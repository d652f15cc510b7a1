"""A loaded reward model answering groups of completions held in memory: what `bigrm serve` and
`bigrm.RewardFunction` score with. A group (one prompt and its completions) takes `bigrm score`'s path: training's
batched tokenising (tokenise.scored_chunk) under the convention the model records, then scoring.score's packed,
prompt-shared forwards, so a served reward is the reward `bigrm score` writes for the same row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bigrm.config import DataConfig
from bigrm.data.examples import Example, Text
from bigrm.data.sequences import Encoded as SeqEncoded
from bigrm.data.sequences import Scored, fit
from bigrm.data.stepwise import step_solutions
from bigrm.data.tokenise import scored_chunk
from bigrm.errors import ConfigError
from bigrm.inference import scoring


@dataclass
class Query:
    """One prompt's completions; `steps`: per completion its steps (a process reward model's input), else None."""

    prompt: Text
    completions: list[Text]
    steps: list[list[str]] | None = None
    per_token: bool = False  # also the value at every completion token
    ids: list[int] | None = None  # one sequence given as token ids (vLLM's token inputs), scored as given


@dataclass
class Encoded:
    """A query's scored sequences, or per completion why it has none (`skipped`, data.overlong: skip)."""

    query: Query
    scored: list[Scored]
    steps: list[np.ndarray] | None
    skipped: dict[int, str]  # completion index → reason; those completions are not in `scored`

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.scored)


class QueryError(ValueError):
    """A query the model cannot score (a completion too long, steps off token boundaries): the client's fault."""


class Rewarder:
    """The model, its tokenizer, the data options rows are read with, and the token budget of one forward."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "auto", attn: str = "auto", **kw) -> None:
        self.device = torch.device(device)
        self.model, self.tokenizer, self.recorded, self.kind = scoring.load_model(path, self.device, dtype, attn)
        self.configure(**kw)

    def configure(
        self, data: DataConfig | None = None, budget: int = 16384, normalize: bool = False
    ) -> None:
        """`data`: data options (default: those the model records: its reward convention, and what its kind reads rows
        with, kind.data_defaults); `normalize`: rewards as
        (r - mean) / std with the reward statistics the export records."""
        recorded = {key.split(".", 1)[1]: value for key, value in self.kind.data_defaults().items()}
        self.data = data or DataConfig(reward_convention=self.recorded or DataConfig.reward_convention, **recorded)
        if budget < self.data.max_length:
            raise ConfigError(f"--max_tokens_per_batch={budget} is below data.max_length={self.data.max_length}")
        self.budget = budget
        tok = self.tokenizer
        first = tok.backend_tokenizer.encode("x", add_special_tokens=True).ids[:1]
        self._adds_bos = (
            self.data.reward_convention == "trl" and tok.bos_token is not None and first == [tok.bos_token_id]
        )
        self.stats = None
        if normalize:
            config = self.model.classifier.config
            mean, std = getattr(config, "bigrm_reward_mean", None), getattr(config, "bigrm_reward_std", None)
            if mean is None or not std:
                raise ConfigError("--normalize: the model records no reward mean/std (bigrm_reward_mean/_std)")
            self.stats = (float(mean), float(std))

    def whole_text(self, text: str) -> str:
        """A rendered text sent whole: a leading BOS the convention adds again is not doubled."""
        bos = self.tokenizer.bos_token
        return text[len(bos) :] if self._adds_bos and text.startswith(bos) else text

    def encode(self, queries: list[Query]) -> list[Encoded]:
        """Every query's scored sequences, tokenised in one batch; a QueryError names the first that cannot be."""
        examples = [self._example(q, i) for i, q in enumerate(queries) if q.ids is None]
        cfg = self.data
        chunks = iter(scored_chunk(examples, self.tokenizer, cfg.max_length, cfg.reward_convention))
        out = []
        for i, query in enumerate(queries):
            seqs = next(chunks) if query.ids is None else [self._from_ids(query.ids, f"input[{i}]: ")]
            scored, skipped = [], {}
            for k, seq in enumerate(seqs):
                if isinstance(seq, int):
                    reason = f"completion {k}: {seq} tokens, longer than data.max_length={cfg.max_length}"
                    if cfg.overlong == "error":
                        raise QueryError(f"{self._where(i, len(queries))}{reason}")
                    skipped[k] = reason
                elif isinstance(seq.steps, str):
                    raise QueryError(f"{self._where(i, len(queries))}completion {k}: {seq.steps}")
                else:
                    scored.append(seq)
            steps = [s.steps for s in scored] if query.steps is not None else None
            out.append(Encoded(query, scored, steps, skipped))
        return out

    def _from_ids(self, ids: list[int], where: str) -> Scored | int:
        """Token ids as the client sent them (no BOS added, nothing re-tokenised), the convention's end token
        appended as for a text that lacks it; the whole sequence is the completion (nothing to cut)."""
        vocab = self.model.classifier.get_input_embeddings().num_embeddings
        bad = next((x for x in ids if not 0 <= x < vocab), None)
        if bad is not None:
            raise QueryError(f"{where}token id {bad} is out of the vocabulary (0 to {vocab - 1})")
        eos = self.tokenizer.eos_token_id
        if self.data.reward_convention != "grpo" and eos is not None and ids[-1] != eos:
            ids = [*ids, eos]
        return fit(SeqEncoded(list(ids), 0, 0, None), "", 0, self.data.max_length)

    @staticmethod
    def _where(i: int, n: int) -> str:
        return f"group {i}: " if n > 1 else ""

    def _example(self, q: Query, i: int) -> Example:
        if q.steps is None:
            return Example(q.prompt, tuple(q.completions), f"group {i}")
        return step_solutions(q.prompt, q.steps, f"group {i}", self.data)

    def score(self, encoded: list[Encoded]) -> list[dict]:
        """Per encoded query: `rewards` (None where skipped), `values` (the head's outputs), `cut` (prompt tokens cut
        per completion), what the kind adds (`attributes` ratings, `step_rewards`) and `skipped` reasons."""
        return [finish(raw, e.skipped) for raw, e in zip(self.score_scored(encoded), encoded, strict=True)]

    def score_scored(self, encoded: list[Encoded]) -> list[dict]:
        """What `score` answers, for the scored completions alone (lists without the skipped ones)."""
        out: list[dict] = [{"rewards": [], "values": [], "cut": []} for _ in encoded]
        for every in (False, True):  # per-token values need every sequence laid out whole: forwarded apart
            todo = [i for i, e in enumerate(encoded) if e.scored and e.query.per_token == every]
            results = [
                scoring.RowResult({}, Example(encoded[i].query.prompt, (), f"group {i}"), encoded[i].scored,
                                  steps=encoded[i].steps)
                for i in todo
            ]  # fmt: skip
            if not results:
                continue
            kind = scoring.kind_for_rows(self.model, results)
            scoring.score(self.model, results, self.budget, self.device, every, share_prompt=True, kind=kind)
            for i, result in zip(todo, results, strict=True):
                out[i] = self._answer(encoded[i], result, kind)
        return out

    def _normal(self, values: list[float]) -> list[float]:
        return [(r - self.stats[0]) / self.stats[1] for r in values] if self.stats else values

    def _answer(self, e: Encoded, result: scoring.RowResult, kind) -> dict:
        out = {"rewards": self._normal(result.rewards), "values": result.values, "cut": [s.cut for s in e.scored]}
        out.update(kind.score_fields(result.values, result.step_values))
        if result.token_values is not None:
            out["per_token_rewards"] = [
                self._normal(v[s.completion_start :].tolist())
                for s, v in zip(e.scored, result.token_values, strict=True)
            ]
        return out


def finish(raw: dict, skipped: dict[int, str]) -> dict:
    """An answer with the skipped completions put back in their place (None) and their reasons."""
    out = {k: ({n: _fill(v, skipped) for n, v in x.items()} if isinstance(x, dict) else _fill(x, skipped))
           for k, x in raw.items()}  # fmt: skip
    if skipped:
        out["skipped"] = {str(k): why for k, why in skipped.items()}
    return out


def _fill(values: list, skipped: dict[int, str]) -> list:
    """Values of the scored completions placed at their completion index, None at the skipped ones."""
    it = iter(values)
    return [None if k in skipped else next(it) for k in range(len(values) + len(skipped))]
