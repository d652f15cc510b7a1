"""Step metrics of a process reward model over a whole eval set: step accuracy, AUROC, error F1 and ProcessBench's
first-error accuracy.

A step is predicted correct when σ(v) >= 0.5 (v >= 0) and is correct when its label y >= 0.5. A solution's first
error is its earliest step that is not correct; ProcessBench's metric compares the predicted first error (the
earliest step predicted incorrect, or none) with the labelled one.
"""

from __future__ import annotations

import torch

from bigrm.evaluation.correlation import average_ranks


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties count
    half), from the average ranks (Mann-Whitney U). NaN without both classes."""
    n_pos, n = int(positive.sum()), len(scores)
    if n_pos in (0, n):
        return float("nan")
    u = average_ranks(scores)[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * (n - n_pos)))


def first_errors(wrong: torch.Tensor, solution: torch.Tensor, num_solutions: int) -> torch.Tensor:
    """(S,) each solution's earliest step flagged in `wrong` (its ordinal within the solution), -1 for none; steps
    come grouped by solution, in order."""
    counts = torch.bincount(solution, minlength=num_solutions)
    ordinal = torch.arange(len(solution)) - (torch.cumsum(counts, 0) - counts)[solution]  # (P,)
    big = len(solution) + 1
    first = torch.full((num_solutions,), big, dtype=torch.long).scatter_reduce(
        0, solution, torch.where(wrong, ordinal, big), "amin"
    )
    return torch.where(first == big, -1, first)


def step_report(values: torch.Tensor, label: torch.Tensor, solution: torch.Tensor) -> dict[str, float]:
    """Step metrics of a whole eval set: values (P,) at step ends, labels (P,), solution (P,) 0..S-1 (steps grouped by
    solution, in order; ids need not be consecutive).
      step_accuracy          fraction of steps whose prediction (σ(v) >= 0.5) matches the label (>= 0.5)
      step_auroc             AUROC of σ(v) for telling correct steps from incorrect ones
      step_error_f1          F1 of predicting "incorrect" on the incorrect steps (the positive class)
      first_error_accuracy_erroneous / _correct   ProcessBench: fraction of solutions with an error whose predicted
                             first error is that step / without one where none is predicted
      first_error_f1         their harmonic mean
    and num_steps, num_solutions."""
    v = values.double().cpu()
    _, solution = torch.unique(solution.cpu(), return_inverse=True)  # 0..S-1, order kept
    correct, predicted = label.cpu() >= 0.5, v >= 0
    err, pred_err = ~correct, ~predicted
    tp = float((err & pred_err).sum())
    f1 = 2 * tp / max(float(err.sum() + pred_err.sum()), 1.0)
    n = int(solution.max()) + 1 if len(solution) else 0
    truth, guess = first_errors(err, solution, n), first_errors(pred_err, solution, n)
    has_error = truth >= 0
    acc_err = float((guess == truth)[has_error].double().mean()) if has_error.any() else float("nan")
    acc_ok = float((guess == truth)[~has_error].double().mean()) if (~has_error).any() else float("nan")
    return {
        "step_accuracy": float((correct == predicted).double().mean()) if len(v) else float("nan"),
        "step_auroc": auroc(v, correct),
        "step_error_f1": f1,
        "first_error_accuracy_erroneous": acc_err,
        "first_error_accuracy_correct": acc_ok,
        "first_error_f1": 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok > 0 else 0.0,
        "num_steps": len(v),
        "num_solutions": n,
    }
