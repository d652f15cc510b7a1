"""Values at step ends → the process-reward (step) loss (its metrics: bigrm.evaluation.steps).

A stepwise solution's step s has the value v_s read at its last token (the separator), a label y_s in [0, 1] (the
probability that the step is correct; booleans are 0 and 1) and its row's weight w_s. The step loss is
    Σ_s w_s · BCE(v_s, y_s) / Σ_s w_s,    BCE(v, y) = -(y log σ(v) + (1 - y) log(1 - σ(v)))
over the steps trained on (every step, or each solution's last with loss.train_on_last_step_only). The sums run over
a whole optimizer step: the trainer passes its Σ w (`step_denominator` of each prompt). With hard labels and unit
weights this is TRL PRMTrainer's loss (cross-entropy of a 2-label token classifier at the separator tokens, whose
logit difference is v), except that TRL casts soft labels to int; here they are exact. Everything is computed for
all steps of a micro-batch at once from index tensors (packing.SegmentLabels' step fields): no loop over steps.

"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigrm.config import LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.data.sequences import Group


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
