"""Plain-PyTorch reference kernels, computed in fp32 whatever the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over rows.

    Logits are [..., classes]; every leading position is a row.
    """
    # [N, C] rows, fp32 so bf16 autocast does not round the softmax
    s = student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # [N]
    return kl.mean() * temperature**2


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float())


def feature_cosine(student: torch.Tensor, teacher: torch.Tensor, dim: int) -> torch.Tensor:
    """1 - cosine similarity along the feature dimension, averaged over positions."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=dim)).mean()
