"""Knowledge-distillation losses (pure torch).

Soft-label distillation after Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a
Neural Network": the student matches the teacher's distribution softened by a temperature T,
mixed with the ordinary cross-entropy on hard labels::

    loss = alpha * T^2 * KL(p_teacher_T || p_student_T) + (1 - alpha) * CE(student, labels)

``p_T = softmax(z / T)``. The T^2 factor keeps the soft-target gradients on the same scale as
the hard-label ones when T changes (section 2 of the paper). When the teacher gives
probabilities rather than logits, its logits are taken as ``log p`` (so ``p_teacher_T`` is
``p ** (1/T)`` renormalised).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a loss is computed: importing this module stays cheap
    import torch

IGNORE_INDEX = -100


def _kl_rows(teacher_log_p_t: torch.Tensor, student_logits_t: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row over the last dim; inputs already divided by T."""
    import torch
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits_t, dim=-1)
    log_p = F.log_softmax(teacher_log_p_t, dim=-1)
    p = log_p.exp()
    # 0 * log 0 = 0: where the teacher gives zero probability the term vanishes.
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def soft_label_kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor | None,
                       *, temperature: float = 4.0, alpha: float = 0.5) -> torch.Tensor:
    """Classifier distillation loss for one batch (a scalar tensor).

    ``student_logits``: [B, C] raw scores. ``teacher_probs``: [B, C] teacher probabilities (each
    row sums to 1; zeros allowed). ``labels``: [B] hard label ids (``-100`` ignores a row's CE
    term) or None for pure distillation (then alpha is taken as 1). KL is averaged over rows, CE
    over rows with a label. Raises ValueError on mismatched shapes or T <= 0 or alpha outside
    [0, 1]. Formula: see the module docstring (Hinton et al. 2015).
    """
    import torch
    import torch.nn.functional as F

    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_probs "
                         f"{tuple(teacher_probs.shape)} must have the same shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    t = float(temperature)
    z = student_logits.float()
    teacher_logits = torch.log(teacher_probs.float().clamp_min(0.0))
    kl = _kl_rows(teacher_logits / t, z / t).mean()
    if labels is None:
        return (t * t) * kl
    ce = F.cross_entropy(z, labels.long(), ignore_index=IGNORE_INDEX) if (labels != IGNORE_INDEX).any() \
        else z.sum() * 0.0
    return alpha * (t * t) * kl + (1.0 - alpha) * ce


def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  *, temperature: float = 1.0, alpha: float = 0.5) -> torch.Tensor:
    """Token-level (logit) distillation of a causal student on a causal teacher's distributions.

    ``student_logits`` and ``teacher_logits``: [B, L, V] over the same vocabulary (the same
    tokenizer). ``labels``: [B, L] token ids with ``-100`` on prompt and padding positions; as in
    causal LM training the logits at position t predict the token at t + 1, so the shift is done
    here. Both the KL and the CE terms are averaged over supervised token positions of the whole
    batch, so padding a batch never changes its loss. Returns a scalar tensor (0 when no position
    is supervised). Raises ValueError on mismatched shapes.
    """
    import torch.nn.functional as F

    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same tokenizer)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    s = student_logits[:, :-1, :].float()
    te = teacher_logits[:, :-1, :].float()
    y = labels[:, 1:]
    mask = y != IGNORE_INDEX
    n = int(mask.sum())
    if n == 0:
        return student_logits.sum() * 0.0
    s_sel, t_sel, y_sel = s[mask], te[mask], y[mask]
    kl = _kl_rows(t_sel / t, s_sel / t).sum() / n
    ce = F.cross_entropy(s_sel, y_sel.long(), reduction="sum") / n
    return alpha * (t * t) * kl + (1.0 - alpha) * ce


__all__ = ["soft_label_kd_loss", "token_kd_loss", "IGNORE_INDEX"]
