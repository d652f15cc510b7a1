"""The built-in multi-attribute task (data.synthetic.task=attributes): reviews rated 0-4 on up to three attributes.

A prompt asks for a review of an item; a completion is 12 words. Its ratings count word classes:
  attribute 0  positive words ("great", "superb", ...)
  attribute 1  4 - negative words ("awful", "broken", ...)
  attribute 2  intensifiers ("very", "truly", ...)
each 0..4, the remaining words neutral: three independent counts, which a tiny model learns in a minute on a CPU.

Ranked training rows are drawn from the model the loss assumes: a Plackett-Luce ranking (sorted by utility plus
Gumbel noise) whose utilities are the scalar reward Σ_a w_a z_a of the standardised ratings z_a (mean 2, std √2 for
ratings uniform on 0..4). The ranking loss's optimum is then the scalar of the rating targets, so the two terms agree;
noise-free rankings would push the scalar's scale up without bound, away from the ratings. Eval rows are ranked by
the utility itself. Rated rows hold one completion with its ratings under the names the config
gives them (HelpSteer2's shape), each rating missing with probability `missing`; ranked rows order K completions by
the weighted sum of their ratings (distinct within a prompt), as the scalar reward is meant to.
"""

from __future__ import annotations

import math
import random

from bigrm.builtin.synthetic import ITEMS, NEGATIVE, POSITIVE

INTENSIFIERS = "very truly really quite so".split()
NEUTRAL = "the it was and with a of this my some then".split()
LENGTH = 12
MAX_RATING = 4
MISSING = 0.15  # probability that a rated row lacks a given rating
MEAN, STD = MAX_RATING / 2, math.sqrt(2.0)  # of a rating uniform on 0..MAX_RATING


def _completion(rng: random.Random, counts: tuple[int, ...]) -> str:
    good, bad, strong = (list(counts) + [0, 0])[:3]
    words = rng.choices(POSITIVE, k=good) + rng.choices(NEGATIVE, k=bad) + rng.choices(INTENSIFIERS, k=strong)
    words += rng.choices(NEUTRAL, k=LENGTH - len(words))
    rng.shuffle(words)
    return " " + " ".join(words)


def _ratings(counts: tuple[int, ...]) -> list[int]:
    """Attribute 1 rewards few opposite words: its count is stored, its rating is 4 - count."""
    return [MAX_RATING - c if a == 1 else c for a, c in enumerate(counts)]


def _prompt(rng: random.Random) -> str:
    return f"write a review of the {rng.choice(ITEMS)}:"


def rated_rows(n: int, names: list[str], missing: float, seed: int) -> list[dict]:
    """`n` rows of {prompt, response, <name>: rating or null}; every row keeps at least one rating."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        counts = tuple(rng.randint(0, MAX_RATING) for _ in names)
        row = {"prompt": _prompt(rng), "response": _completion(rng, counts)}
        kept = [rng.random() >= missing for _ in names]
        kept[rng.randrange(len(names))] = True
        row.update({name: r if keep else None for name, r, keep in zip(names, _ratings(counts), kept, strict=True)})
        rows.append(row)
    return rows


def ranked_rows(
    n: int, names: list[str], weights: list[float], min_k: int, max_k: int, seed: int, rated: bool
) -> list[dict]:
    """`n` rows of {prompt, ranked_outputs}, K uniform in [min_k, max_k] with distinct utilities Σ_a weights[a] z_a.
    With `rated` (eval rows): ordered by utility, with <name>: [rating per completion]; else a Plackett-Luce draw."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        k = rng.randint(min_k, max_k)
        by_value: dict[float, tuple[int, ...]] = {}
        for _ in range(50 * k):  # K distinct scalar values; the few prompts that cannot get them are drawn again
            counts = tuple(rng.randint(0, MAX_RATING) for _ in names)
            utility = sum(w * (r - MEAN) / STD for w, r in zip(weights, _ratings(counts), strict=True))
            by_value.setdefault(utility, counts)
            if len(by_value) == k:
                break
        if len(by_value) < k:
            continue
        # Gumbel-max: sorting utility + Gumbel noise draws a ranking from the Plackett-Luce model of the utilities
        noisy = {v: v if rated else v - math.log(-math.log(rng.random() or 1e-300)) for v in by_value}
        ordered = [by_value[v] for v in sorted(by_value, key=noisy.get, reverse=True)]
        outputs = [_completion(rng, c) for c in ordered]
        if len(set(outputs)) < k:
            continue
        row = {"prompt": _prompt(rng), "ranked_outputs": outputs}
        if rated:
            row.update({name: [_ratings(c)[a] for c in ordered] for a, name in enumerate(names)})
        rows.append(row)
    return rows
