"""The built-in K-ranked task: small enough for a tiny model to learn on a CPU, hard enough to need the prompt.

A prompt asks for a positive or a negative review; each completion is 8 words mixing wanted-polarity, opposite
and neutral words. Quality = (#wanted − #opposite), distinct within a prompt, so the ranking is strict and the
model must read the prompt to know which words count.

The stepwise task (`make_step_rows`, for process reward models) asks for positive reviews written in steps of
STEP_WORDS words; a step is correct while no step so far has used a negative word (a solution is right up to its
first error, as in Math-Shepherd). The rule does not depend on the prompt: a tiny model learns it in a few hundred
CPU steps, where one that swapped the error words with the prompt's sentiment stays near chance as long.

The length-biased task (`make_length_rows`, for length-disentangled reward models) is pairs of reviews of 4 to 16
words whose quality does not depend on length, with training labels that prefer the longer review more often than
quality says: a model that learns the labels' length preference rewards length.

The noisy-label task (`make_noisy_rows`, for ensembles) is the ranked task's pairs with a share of the training labels
flipped: what a member learns of the flipped pairs is noise its siblings do not share.
"""

from __future__ import annotations

import random

ITEMS = "phone laptop camera movie book hotel pizza coffee bike song game chair".split()
POSITIVE = "great superb lovely perfect brilliant delightful excellent charming stellar splendid".split()
NEGATIVE = "awful dreadful broken terrible horrible clumsy dismal shoddy gloomy lousy".split()
NEUTRAL = "the it was and with a very of this my some quite also then".split()
WORDS = ITEMS + POSITIVE + NEGATIVE + NEUTRAL + "write review positive negative".split()
LENGTH = 8


def _completion(rng: random.Random, wanted: list[str], opposite: list[str], n_good: int, n_bad: int) -> str:
    words = rng.choices(wanted, k=n_good) + rng.choices(opposite, k=n_bad)
    words += rng.choices(NEUTRAL, k=LENGTH - len(words))
    rng.shuffle(words)
    return " " + " ".join(words)


def make_rows(n: int, min_k: int, max_k: int, seed: int) -> list[dict]:
    """`n` rows of {prompt, ranked_outputs} with K uniform in [min_k, max_k]."""
    rng = random.Random(seed)
    # every (good, bad) split of up to LENGTH sentiment words, keyed by its quality good - bad
    by_quality: dict[int, list[tuple[int, int]]] = {}
    for good in range(LENGTH + 1):
        for bad in range(LENGTH + 1 - good):
            by_quality.setdefault(good - bad, []).append((good, bad))
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        wanted, opposite = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
        k = rng.randint(min_k, max_k)
        qualities = sorted(rng.sample(sorted(by_quality), k), reverse=True)
        outputs = []
        for q in qualities:
            good, bad = rng.choice(by_quality[q])
            outputs.append(_completion(rng, wanted, opposite, good, bad))
        if len(set(outputs)) < k:  # astronomically rare; keep the data valid rather than special-case it later
            continue
        prompt = f"write a {'positive' if positive else 'negative'} review of the {rng.choice(ITEMS)}:"
        rows.append({"prompt": prompt, "ranked_outputs": outputs})
    return rows


STEP_WORDS = 3


def _step(rng: random.Random, error: bool) -> str:
    words = [rng.choice(NEGATIVE if error else POSITIVE)] + rng.choices(NEUTRAL, k=STEP_WORDS - 1)
    rng.shuffle(words)
    return " " + " ".join(words)


def make_step_rows(n: int, min_k: int, max_k: int, seed: int, min_steps: int = 2, max_steps: int = 5) -> list[dict]:
    """`n` stepwise rows {prompt, completions: [step, ...], labels: [bool, ...]}: prompts with min_k..max_k
    solutions each (one row per solution, consecutive); about half the solutions make an error at a random step."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < n:
        prompt = f"write a positive review of the {rng.choice(ITEMS)} in steps:"
        for _ in range(min(rng.randint(min_k, max_k), n - len(rows))):
            length = rng.randint(min_steps, max_steps)
            first_error = rng.randrange(length) if rng.random() < 0.5 else length
            steps = [_step(rng, k == first_error) for k in range(length)]
            rows.append({"prompt": prompt, "completions": steps, "labels": [k < first_error for k in range(length)]})
    return rows


LENGTHS = (4, 16)  # words of a length-task review
SENTIMENT_WORDS = 4  # at most, whatever the length: quality does not grow with it


def _length_pair(rng: random.Random, wanted: list[str], opposite: list[str], longer_wins: bool) -> tuple[str, str]:
    """(better, worse) reviews of distinct lengths and distinct qualities, the better the longer if `longer_wins`."""
    q_better, q_worse = sorted(rng.sample(range(-SENTIMENT_WORDS, SENTIMENT_WORDS + 1), 2), reverse=True)
    long, short = sorted(rng.sample(range(LENGTHS[0], LENGTHS[1] + 1), 2), reverse=True)
    texts = []
    for q, n in ((q_better, long if longer_wins else short), (q_worse, short if longer_wins else long)):
        good = rng.randint(max(q, 0), (SENTIMENT_WORDS + q) // 2)  # good - bad = q, good + bad <= SENTIMENT_WORDS
        words = rng.choices(wanted, k=good) + rng.choices(opposite, k=good - q)
        words += rng.choices(NEUTRAL, k=n - len(words))
        rng.shuffle(words)
        texts.append(" " + " ".join(words))
    return texts[0], texts[1]


def make_length_rows(n: int, seed: int, bias: float, held_out: bool) -> list[dict]:
    """`n` pairs {prompt, ranked_outputs: [preferred, other]} of the length-biased task: quality is the ranked task's
    (#wanted − #opposite) and independent of length. Training pairs (`held_out` False): where the better review is
    the shorter, the label prefers the longer with probability `bias`. Held-out pairs: labelled by quality, the
    better review the longer in every other pair."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = rng.random() < 0.5
        wanted, opposite = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
        longer_wins = i % 2 == 0 if held_out else rng.random() < 0.5
        better, worse = _length_pair(rng, wanted, opposite, longer_wins)
        flipped = not held_out and not longer_wins and rng.random() < bias
        prompt = f"write a {'positive' if positive else 'negative'} review of the {rng.choice(ITEMS)}:"
        rows.append({"prompt": prompt, "ranked_outputs": [worse, better] if flipped else [better, worse]})
    return rows


def make_noisy_rows(n: int, seed: int, noise: float, held_out: bool) -> list[dict]:
    """`n` pairs {prompt, ranked_outputs: [preferred, other]} of the ranked task; training pairs (`held_out` False)
    have their order flipped with probability `noise`, held-out pairs are ranked by quality."""
    rows, rng = make_rows(n, 2, 2, seed), random.Random(seed + 7)
    for row in rows:
        if not held_out and rng.random() < noise:
            row["ranked_outputs"].reverse()
    return rows
