"""Row formats: each one owns how it is recognised from a file's columns, how one row becomes an Example, and which
columns hold its completions (`bigrm score --segments` joins their pieces). What they share is
bigrm.data.row_format's; the stepwise format is bigrm.data.stepwise's. Detection tries them in FORMATS' order:
"""

from __future__ import annotations

from dataclasses import replace

from bigrm.config import DataConfig
from bigrm.data.examples import RowError, Text, completion, finite_number, is_messages
from bigrm.data.labels import Labels
from bigrm.data.row_format import Drawn, RowFormat
from bigrm.data.stepwise import Stepwise
from bigrm.errors import DataError


class Listed(RowFormat):
    """Completions in one list column: ranked (best first, tie blocks) and scored (ranked by their scores)."""

    by_position = False  # ranked by their place in the list, a tie block sharing one place

    def column(self, cfg: DataConfig) -> str:
        raise NotImplementedError

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        return [(self.column(cfg), True)]

    def drawn(self, row: dict, prompt: Text | None, cfg: DataConfig, where: str) -> Drawn | RowError:
        col = self.column(cfg)
        listed = row.get(col)
        if listed is None:
            return RowError(where, col, "missing")
        if not isinstance(listed, list):
            return RowError(where, col, f"must be a list, got {type(listed).__name__}")
        raw, fields, ranks = [], [], []
        for i, entry in enumerate(listed):
            # a list that is not one chat conversation is a block of completions tied at this rank
            block = self.by_position and isinstance(entry, list) and not is_messages(entry)
            if block and not entry:
                return RowError(where, f"{col}[{i}]", "an empty list of tied completions")
            for j, value in enumerate(entry if block else [entry]):
                raw.append(value)
                fields.append(f"{col}[{i}][{j}]" if block else f"{col}[{i}]")
                ranks.append(i)
        if len(raw) < 2:
            return RowError(where, col, f"needs at least 2 completions, got {len(raw)}")
        return prompt, raw, fields, ranks if self.by_position else None


class Ranked(Listed):
    name = "ranked"
    by_position = True
    description = "{prompt, ranked_outputs: [best, ..., worst]}: a list that is not a conversation is a tie block"

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        return cfg.ranked_column in columns

    def expected(self, cfg: DataConfig) -> str | None:
        return f"{cfg.ranked_column!r} (ranked)"

    def column(self, cfg: DataConfig) -> str:
        return cfg.ranked_column


class Scored(Listed):
    name = "scored"
    description = "{prompt, completions: [completion, ...], scores: [number, ...]}: ranked by score"

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        return cfg.completions_column in columns and cfg.scores_column in columns

    def expected(self, cfg: DataConfig) -> str | None:
        return f"{cfg.completions_column!r} and {cfg.scores_column!r} (scored)"

    def column(self, cfg: DataConfig) -> str:
        return cfg.completions_column

    def labelled(self, labels: Labels, row: dict, cfg: DataConfig, where: str) -> Labels | RowError:
        scores, k = row.get(cfg.scores_column), len(labels.ranks)  # one rank per completion so far
        if not isinstance(scores, list) or len(scores) != k:
            return RowError(where, cfg.scores_column, f"needs one number per completion ({k})")
        bad = next((i for i, v in enumerate(scores) if not finite_number(v)), None)
        if bad is not None:
            return RowError(
                where,
                f"{cfg.scores_column}[{bad}]",
                f"must be a finite number within float32's range, got {scores[bad]!r}",
            )
        distinct = sorted(set(scores), reverse=True)  # equal scores share a rank: ties
        return replace(labels, ranks=tuple(distinct.index(v) for v in scores), scores=tuple(map(float, scores)))


class Pairwise(RowFormat):
    name = "pairwise"
    description = "{prompt, chosen, rejected}"

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        return {cfg.chosen_column, cfg.rejected_column, cfg.prompt_column} <= columns

    def expected(self, cfg: DataConfig) -> str | None:
        return f"{cfg.chosen_column!r} and {cfg.rejected_column!r} (pairwise, with or without {cfg.prompt_column!r})"

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        return [(cfg.chosen_column, False), (cfg.rejected_column, False)]

    def drawn(self, row: dict, prompt: Text | None, cfg: DataConfig, where: str) -> Drawn | RowError:
        raw, fields = [], [cfg.chosen_column, cfg.rejected_column]
        for col in fields:
            if row.get(col) is None:
                return RowError(where, col, "missing")
            raw.append(row[col])
        return prompt, raw, fields, None


class Implicit(RowFormat):
    name = "implicit"
    description = "{chosen, rejected}: the prompt is their shared prefix (see DataConfig.assistant_marker)"

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        return cfg.chosen_column in columns and cfg.rejected_column in columns

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        return "--segments with pieces needs an explicit prompt column (or use --separator)"

    def prompt(self, row: dict, cfg: DataConfig, where: str) -> Text | RowError | None:
        return None  # there is no prompt column: the prompt is cut from the completions

    def drawn(self, row: dict, prompt: Text | None, cfg: DataConfig, where: str) -> Drawn | RowError:
        for col in (cfg.chosen_column, cfg.rejected_column):
            if row.get(col) is None:
                return RowError(where, col, "missing")
            _, problem = completion(row[col], col)
            if problem:
                return RowError(where, col, problem)
        split = split_implicit(row[cfg.chosen_column], row[cfg.rejected_column], cfg.assistant_marker)
        if isinstance(split, str):
            return RowError(where, f"{cfg.chosen_column}/{cfg.rejected_column}", split)
        prompt, *raw = split
        return prompt, raw, [cfg.chosen_column, cfg.rejected_column], None


class Rated(RowFormat):
    name = "rated"
    description = "{prompt, response, <attribute>: rating, ...}: one completion rated on data.attributes (HelpSteer2)"
    rated = True

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        if not (cfg.response_column in columns and cfg.prompt_column in columns):
            return False
        if not cfg.attributes:
            raise DataError(
                f"{path}: rows of {cfg.prompt_column!r} and {cfg.response_column!r} are rated completions: name their "
                "rating columns in data.attributes"
            )
        return True

    def expected(self, cfg: DataConfig) -> str | None:
        return f"{cfg.prompt_column!r} and {cfg.response_column!r} (rated, with data.attributes)"

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        return [(cfg.response_column, False)]

    def drawn(self, row: dict, prompt: Text | None, cfg: DataConfig, where: str) -> Drawn | RowError:
        if row.get(cfg.response_column) is None:
            return RowError(where, cfg.response_column, "missing")
        return prompt, [row[cfg.response_column]], [cfg.response_column], None


# in detection order: a file with several formats' columns is the first of them
FORMATS: dict[str, RowFormat] = {f.name: f for f in (Ranked(), Scored(), Stepwise(), Pairwise(), Implicit(), Rated())}
__doc__ = (__doc__ or "") + "".join(f"  {f.name:<14}{f.description}\n" for f in FORMATS.values())


def detect(columns: set[str], cfg: DataConfig, path: str) -> RowFormat:
    for fmt in FORMATS.values():
        if fmt.detects(columns, cfg, path):
            return fmt
    expected = [e for e in (f.expected(cfg) for f in FORMATS.values()) if e]
    raise DataError(
        f"{path}: cannot tell the format from columns {sorted(columns)}: expected {', '.join(expected[:-1])}, "
        f"or {expected[-1]}; column names are set with data.*_column"
    )


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_implicit(chosen: Text, rejected: Text, marker: str) -> tuple[Text, Text, Text] | str:
    """(prompt, chosen completion, rejected completion) from two full texts/conversations, or a reason."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            return "chosen and rejected conversations share no prompt messages"
        if n == len(chosen) or n == len(rejected):
            return "one conversation is a prefix of the other: nothing left to score"
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, list) or isinstance(rejected, list):
        return "chosen and rejected must both be text or both be chat messages"
    n = _common_prefix(chosen, rejected)
    cut = chosen.rfind(marker, 0, n) if marker else -1
    n = cut + len(marker) if cut >= 0 else n
    if n == 0:
        return "chosen and rejected share no prefix to use as the prompt"
    return chosen[:n], chosen[n:], rejected[n:]
