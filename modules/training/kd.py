"""The knowledge-distillation loss, shared by `distill` and the fine-tune of the pruning steps.

loss = alpha * T**2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, labels), with
p = softmax(logits / T) (Hinton et al.); T**2 keeps the soft term's gradients on the scale
of the hard term's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.training.finetune import LossFn, eval_mode


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE, batch-mean."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def teacher_loss(teacher: nn.Module, *, temperature: float, alpha: float) -> LossFn:
    """fit's loss_fn: kd_loss against `teacher` (eval mode, never trained) on each batch."""
    eval_mode(teacher)

    def loss_fn(
        logits: torch.Tensor, inputs: tuple[torch.Tensor, ...], yb: torch.Tensor
    ) -> torch.Tensor:
        # no_grad, not inference_mode: kl_div saves the teacher's output for backward.
        with torch.no_grad():
            teacher_logits = teacher(*inputs).float()
        return kd_loss(logits, teacher_logits, yb, temperature=temperature, alpha=alpha)

    return loss_fn
