"""Values at step ends → the process-reward (step) loss, and the step metrics of evaluation.

A stepwise solution's step s has the value v_s read at its last token (the separator), a label y_s in [0, 1] (the
probability that the step is correct; booleans are 0 and 1) and its row's weight w_s. The step loss is
    Σ_s w_s · BCE(v_s, y_s) / Σ_s w_s,    BCE(v, y) = -(y log σ(v) + (1 - y) log(1 - σ(v)))
over the steps trained on (every step, or each solution's last with loss.train_on_last_step_only). The sums run over
a whole optimizer step: the trainer passes its Σ w (`step_denominator` of each prompt). With hard labels and unit
weights this is TRL PRMTrainer's loss (cross-entropy of a 2-label token classifier at the separator tokens, whose
logit difference is v), except that TRL casts soft labels to int; here they are exact. Everything is computed for
all steps of a micro-batch at once from index tensors (packing.SegmentLabels' step fields): no loop over steps.

A step is predicted correct when σ(v) >= 0.5 (v >= 0) and is correct when y >= 0.5. A solution's first error is its
earliest step that is not correct; ProcessBench's metric compares the predicted first error (the earliest step
predicted incorrect, or none) with the labelled one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigrm.config import LossConfig
from bigrm.correlation import average_ranks
from bigrm.packing import SegmentLabels
from bigrm.sequences import Group


def trained_steps(labels: SegmentLabels, cfg: LossConfig) -> torch.Tensor:
    """(P,) bool: the steps the loss trains on."""
    return labels.step_last if cfg.train_on_last_step_only else torch.ones_like(labels.step_last)


def step_denominator(group: Group, cfg: LossConfig) -> float:
    """Σ w over the steps of this prompt that the loss trains on, from its labels alone."""
    lab = group.labels
    if lab.steps is None:
        return 0.0
    return sum(
        w * (1 if cfg.train_on_last_step_only else len(s)) for s, w in zip(lab.steps, lab.step_weights, strict=True)
    )


def step_loss(
    values: torch.Tensor, labels: SegmentLabels, cfg: LossConfig, weight_sum: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, sums): the step loss of this micro-batch's steps with the optimizer step's Σ w (default: this
    micro-batch's own), and the additive sums loss.Stats keeps of it (step_loss_num, step_weight_sum, steps,
    correct_steps)."""
    v = values.double() if values.dtype == torch.float64 else values.float()  # (P,) never below fp32
    y = labels.step_label.to(v.dtype)
    w = labels.step_weight.to(v.dtype) * trained_steps(labels, cfg)  # (P,)
    bce = F.binary_cross_entropy_with_logits(v, y, reduction="none")  # (P,)
    if weight_sum is None:
        weight_sum = float(w.sum())
    loss = (w * bce).sum() / max(weight_sum, 1e-12)
    with torch.no_grad():
        sums = {
            "step_loss_num": (w * bce).sum().double(),
            "step_weight_sum": w.sum().double(),
            "steps": torch.tensor(len(v), dtype=torch.float64),
            "correct_steps": ((v.detach() >= 0) == (y >= 0.5)).sum().double(),
        }
    return loss, {k: t.to(values.device) for k, t in sums.items()}


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
