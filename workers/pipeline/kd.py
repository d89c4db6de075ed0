"""Knowledge-distillation losses (pure torch).

Soft-label distillation after Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a
Neural Network": the student matches the teacher's distribution softened by a temperature T,
mixed with the ordinary cross-entropy on hard labels::

    loss = alpha * T^2 * KL(p_teacher_T || p_student_T) + (1 - alpha) * CE(student, labels)

``p_T = softmax(z / T)``. The T^2 factor keeps the soft-target gradients on the same scale as
the hard-label ones when T changes (section 2 of the paper). When the teacher gives
probabilities rather than logits, its logits are taken as ``log p`` (so ``p_teacher_T`` is
``p ** (1/T)`` renormalised).

Beyond the response (logit) loss, added to it by weights in ``workers.pipeline.training``:

- ``feature_kd_loss``: hidden-state hints through a learned projection (FitNets, Romero et al. 2015);
- ``relation_kd_loss``: similarity-preserving KD on the batch's pairwise similarities (Tung & Mori 2019);
- ``uld_loss``: Universal Logit Distillation between a student and a teacher with different
  tokenizers (Boizard et al. 2024), also from an API teacher's top-K log-probabilities.
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


# --- feature- and relation-based distillation -----------------------------------------------


def feature_kd_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection=None) -> torch.Tensor:
    """Hint (hidden-state) loss of FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep
    Nets"): the student's hidden states, mapped by a learned ``projection`` (the paper's
    regressor; here a linear layer ``D_s -> D_t``), match the teacher's by mean squared error::

        loss = mean_{n, d} (projection(h_s)[n, d] - h_t[n, d])^2

    ``student_hidden``: [N, D_s]; ``teacher_hidden``: [N, D_t] (N: the matched positions, e.g.
    a batch's mean-pooled sequences or its supervised tokens, already selected by the caller).
    ``projection``: a callable [N, D_s] -> [N, D_t] (an ``nn.Linear``) or None when D_s = D_t.
    Returns a scalar tensor (0 when N = 0). Raises ValueError on mismatched shapes."""
    s = student_hidden if projection is None else projection(student_hidden)
    if s.shape != teacher_hidden.shape:
        raise ValueError(f"projected student hidden states {tuple(s.shape)} and teacher hidden states "
                         f"{tuple(teacher_hidden.shape)} must have the same shape")
    if s.shape[0] == 0:
        return s.sum() * 0.0
    return ((s.float() - teacher_hidden.float()) ** 2).mean()


def _sp_gram(x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    x = x.float().flatten(1)
    return F.normalize(x @ x.t(), p=2, dim=1)


def relation_kd_loss(student_repr: torch.Tensor, teacher_repr: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving loss (Tung & Mori 2019, "Similarity-Preserving Knowledge
    Distillation", eq. 2-4): samples that the teacher represents alike should be represented
    alike by the student. For the batch's representations A ([B, D]) the pairwise similarity
    matrix ``G = A A^T`` ([B, B]) is normalised row-wise to unit L2 norm, and::

        loss = ||G_s - G_t||_F^2 / B^2

    ``student_repr``: [B, D_s]; ``teacher_repr``: [B, D_t]; D_s and D_t may differ (only the
    B x B matrices are compared, so no projection is needed). Returns a scalar tensor (0 for
    B < 2, where there is no pair). Raises ValueError when the batch sizes differ."""
    if student_repr.shape[0] != teacher_repr.shape[0]:
        raise ValueError(f"student ({student_repr.shape[0]}) and teacher ({teacher_repr.shape[0]}) batch sizes differ")
    b = student_repr.shape[0]
    if b < 2:
        return student_repr.sum() * 0.0
    return ((_sp_gram(student_repr) - _sp_gram(teacher_repr)) ** 2).sum() / (b * b)


# --- cross-tokenizer distillation ------------------------------------------------------------


def uld_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, *, temperature: float = 1.0,
             reduction: str = "mean") -> torch.Tensor:
    """Universal Logit Distillation loss (Boizard et al. 2024, "Towards Cross-Tokenizer
    Distillation: the Universal Logit Distillation Loss for LLMs", eq. 5): the closed-form
    Wasserstein-1 distance between the teacher's and the student's distributions once both
    are sorted in decreasing order and padded with zeros to the same size, so that the two
    vocabularies need no mapping::

        ULD(p_s, p_t) = sum_i |sort(p_s)_i - sort(p_t)_i|

    ``student_logits``: [N, V_s] raw scores at N answer positions (already aligned by position
    with the teacher's answer tokens); ``p_s = softmax(student_logits / temperature)``.
    ``teacher_probs``: [N, K] the teacher's probabilities at the same positions, any order: a
    whole distribution (K = its vocabulary size, rows sum to 1) or only its top K (an API's
    ``top_logprobs``, rows sum to less than 1). The K largest student probabilities are matched
    with the teacher's K, and the mass outside them (``1 - sum``) is compared as one bucket::

        loss = sum_{i<=K} |s_(i) - t_(i)| + |(1 - sum_{i<=K} s_(i)) - (1 - sum_{i<=K} t_(i))|

    For a whole teacher distribution this equals the paper's ULD exactly (the teacher's padded
    zeros meet the student's tail); for a top-K one it is the distance with the unknown tail
    lumped into one bucket, a lower bound of the full ULD that is 0 when the distributions agree.
    Permutation invariant in both vocabularies. ``reduction``: ``"mean"`` over the N positions
    or ``"sum"``. Returns a scalar tensor (0 when N = 0). Raises ValueError on N mismatch, T <= 0
    or an unknown reduction."""
    import torch

    if student_logits.shape[0] != teacher_probs.shape[0]:
        raise ValueError(f"student ({student_logits.shape[0]}) and teacher ({teacher_probs.shape[0]}) "
                         "positions differ; align the answers first")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    p_s = torch.softmax(student_logits.float() / float(temperature), dim=-1)
    t = teacher_probs.float().clamp_min(0.0)
    k = t.shape[1]
    t_sorted = torch.sort(t, dim=-1, descending=True).values
    s_top = torch.topk(p_s, min(k, p_s.shape[1]), dim=-1).values
    if s_top.shape[1] < k:  # a student vocabulary smaller than the teacher's list: pad with zeros
        s_top = torch.cat([s_top, s_top.new_zeros(n, k - s_top.shape[1])], dim=1)
    tail_s = (1.0 - s_top.sum(-1)).clamp_min(0.0)
    tail_t = (1.0 - t_sorted.sum(-1)).clamp_min(0.0)
    per_row = (s_top - t_sorted).abs().sum(-1) + (tail_s - tail_t).abs()
    return per_row.mean() if reduction == "mean" else per_row.sum()


__all__ = ["soft_label_kd_loss", "token_kd_loss", "feature_kd_loss", "relation_kd_loss", "uld_loss", "IGNORE_INDEX"]
