"""KD losses (workers/pipeline/kd.py) against hand-computed numbers."""
import math

import pytest
import torch

from workers.pipeline.kd import feature_kd_loss, relation_kd_loss, soft_label_kd_loss, token_kd_loss, uld_loss

# Teacher p = [0.8, 0.2]; student logits [0, 0] -> q = [0.5, 0.5]; hard label 0.
# T = 1: KL = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5) = 0.376003 - 0.183258 = 0.192745; CE = ln 2 = 0.693147
#        loss(alpha=0.5) = 0.5 * 1 * 0.192745 + 0.5 * 0.693147 = 0.442946
# T = 4: p_T = p^(1/4) / sum = [0.945742, 0.668740] / 1.614482 = [0.585786, 0.414214]
#        KL = 0.585786 ln(1.171573) + 0.414214 ln(0.828427) = 0.014792
#        loss = 0.5 * 16 * 0.014792 + 0.5 * 0.693147 = 0.464907
TEACHER = torch.tensor([[0.8, 0.2]])
STUDENT = torch.tensor([[0.0, 0.0]])
LABEL = torch.tensor([0])


def test_soft_label_loss_t1_by_hand():
    assert soft_label_kd_loss(STUDENT, TEACHER, LABEL, temperature=1.0, alpha=0.5).item() == pytest.approx(0.442946, abs=1e-5)
    # alpha = 1: pure KL; alpha = 0: pure CE
    assert soft_label_kd_loss(STUDENT, TEACHER, LABEL, temperature=1.0, alpha=1.0).item() == pytest.approx(0.192745, abs=1e-5)
    assert soft_label_kd_loss(STUDENT, TEACHER, LABEL, temperature=1.0, alpha=0.0).item() == pytest.approx(math.log(2), abs=1e-6)


def test_soft_label_loss_t4_by_hand():
    assert soft_label_kd_loss(STUDENT, TEACHER, LABEL, temperature=4.0, alpha=0.5).item() == pytest.approx(0.464907, abs=1e-5)
    assert soft_label_kd_loss(STUDENT, TEACHER, None, temperature=4.0).item() == pytest.approx(16 * 0.014792, abs=1e-4)


def test_kl_term_is_zero_for_equal_distributions():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    probs = torch.softmax(logits, dim=-1)
    for t in (1.0, 4.0):
        assert soft_label_kd_loss(logits, probs, None, temperature=t).item() == pytest.approx(0.0, abs=1e-6)
        assert token_kd_loss(logits[None], logits[None], torch.tensor([[1, 2]]), temperature=t, alpha=1.0).item() == \
            pytest.approx(0.0, abs=1e-6)


def test_rows_without_label_skip_ce_and_bad_settings_raise():
    two = soft_label_kd_loss(torch.zeros(2, 2), torch.tensor([[0.8, 0.2], [0.8, 0.2]]), torch.tensor([0, -100]),
                             temperature=1.0, alpha=0.5)
    assert two.item() == pytest.approx(0.442946, abs=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        soft_label_kd_loss(STUDENT, TEACHER, LABEL, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        soft_label_kd_loss(torch.zeros(1, 3), TEACHER, LABEL)


def test_token_loss_by_hand_and_padding_invariance():
    torch.manual_seed(0)
    V = 5
    # One row of 4 tokens: prompt at 0-1 (masked), answer at 2-3.
    s = torch.randn(1, 4, V)
    t = torch.randn(1, 4, V)
    labels = torch.tensor([[-100, -100, 3, 1]])
    loss = token_kd_loss(s, t, labels, temperature=2.0, alpha=0.5)
    # By hand: positions 1 and 2 predict tokens 3 and 1.
    kl = ce = 0.0
    for pos, tok in ((1, 3), (2, 1)):
        p = torch.softmax(t[0, pos] / 2, -1)
        q = torch.log_softmax(s[0, pos] / 2, -1)
        kl += float((p * (p.log() - q)).sum())
        ce += float(-torch.log_softmax(s[0, pos], -1)[tok])
    assert loss.item() == pytest.approx(0.5 * 4 * kl / 2 + 0.5 * ce / 2, rel=1e-5)
    # The same row padded to 7 with garbage logits on padding, batched with another row.
    s_pad = torch.cat([s, torch.randn(1, 3, V) * 50], dim=1)
    t_pad = torch.cat([t, torch.randn(1, 3, V) * 50], dim=1)
    lab_pad = torch.tensor([[-100, -100, 3, 1, -100, -100, -100]])
    assert token_kd_loss(s_pad, t_pad, lab_pad, temperature=2.0).item() == pytest.approx(loss.item(), rel=1e-6)
    # Batched with a second row: the loss is the mean over all supervised positions of both rows.
    s2, t2 = torch.randn(1, 7, V), torch.randn(1, 7, V)
    lab2 = torch.tensor([[-100, 2, 4, 0, 1, -100, -100]])
    one = token_kd_loss(s2, t2, lab2, temperature=2.0)
    both = token_kd_loss(torch.cat([s_pad, s2]), torch.cat([t_pad, t2]), torch.cat([lab_pad, lab2]), temperature=2.0)
    assert both.item() == pytest.approx((2 * loss.item() + 4 * one.item()) / 6, rel=1e-5)


def test_token_loss_rejects_different_vocabularies():
    with pytest.raises(ValueError, match="same tokenizer"):
        token_kd_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6), torch.tensor([[1, 2, 3]]))


# --- FitNets hint loss (Romero et al. 2015) -------------------------------------------------


def test_feature_loss_through_a_projection_by_hand():
    proj = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0]]))
    s, t = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[3.0], [1.0]])
    # projected [1, 0]: ((1-3)^2 + (0-1)^2) / 2 = 2.5
    assert feature_kd_loss(s, t, proj).item() == pytest.approx(2.5)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 1.0]]))  # projected [3, 1]: equal to the teacher
    assert feature_kd_loss(s, t, proj).item() == pytest.approx(0.0)
    assert feature_kd_loss(t, t).item() == 0.0  # same size: no projection needed
    loss = feature_kd_loss(s, t, proj) + feature_kd_loss(s, t + 1, proj)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0  # the projection learns
    with pytest.raises(ValueError, match="same shape"):
        feature_kd_loss(s, t)
    assert feature_kd_loss(torch.zeros(0, 2), torch.zeros(0, 1), proj).item() == 0.0


# --- similarity-preserving loss (Tung & Mori 2019) ------------------------------------------


def test_relation_loss_by_hand():
    # Student [[1,0],[0,1]]: G = I, rows already unit. Teacher [[1,0],[1,0]]: G = all ones,
    # rows / sqrt(2). ||G_s - G_t||^2 = 2 (1 - 0.707107)^2 + 2 (0.707107)^2 = 1.171573; / B^2 = 0.292893
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert relation_kd_loss(s, t).item() == pytest.approx(0.292893, abs=1e-5)
    # Only relations count: other widths, scales and rotations of the teacher give 0
    t3 = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    assert relation_kd_loss(s, t3).item() == pytest.approx(0.0, abs=1e-7)
    assert relation_kd_loss(s[:1], t[:1]).item() == 0.0  # one sample: no pair
    with pytest.raises(ValueError, match="batch sizes"):
        relation_kd_loss(s, t[:1])


# --- Universal Logit Distillation (Boizard et al. 2024) -------------------------------------


def test_uld_known_small_vectors():
    # student [0.5, 0.5] vs teacher [0.9, 0.1]: |0.5-0.9| + |0.5-0.1| = 0.8
    assert uld_loss(torch.zeros(1, 2), torch.tensor([[0.9, 0.1]])).item() == pytest.approx(0.8, abs=1e-6)
    # Student vocabulary 3 (uniform), teacher 2: teacher padded [0.5, 0.5, 0] ->
    # 2 |1/3 - 1/2| + |1/3 - 0| = 2/3
    assert uld_loss(torch.zeros(1, 3), torch.tensor([[0.5, 0.5]])).item() == pytest.approx(2 / 3, abs=1e-6)
    # Student vocabulary 2, teacher 3: student padded [0.5, 0.5, 0] vs [0.6, 0.3, 0.1]: 0.1 + 0.2 + 0.1
    assert uld_loss(torch.zeros(1, 2), torch.tensor([[0.3, 0.1, 0.6]])).item() == pytest.approx(0.4, abs=1e-6)
    # Top-1 teacher (an API's top_logprobs): [0.6], tail 0.4; student [0.5, 0.3, 0.2]:
    # |0.5 - 0.6| + |0.5 - 0.4| = 0.2
    st = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert uld_loss(st, torch.tensor([[0.6]])).item() == pytest.approx(0.2, abs=1e-6)
    # mean vs sum over positions
    two_s, two_t = torch.zeros(2, 2), torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    assert uld_loss(two_s, two_t).item() == pytest.approx(0.4, abs=1e-6)
    assert uld_loss(two_s, two_t, reduction="sum").item() == pytest.approx(0.8, abs=1e-6)


def test_uld_is_permutation_invariant_and_zero_for_equal_sorted_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=g)
    p = torch.softmax(logits, -1)
    perm = torch.randperm(7, generator=g)
    # Teacher = the student's distribution with its vocabulary shuffled: distance 0
    assert uld_loss(logits, p[:, perm]).item() == pytest.approx(0.0, abs=1e-6)
    # Same sorted values in a bigger vocabulary (zeros elsewhere): still 0
    assert uld_loss(logits, torch.cat([p[:, perm], torch.zeros(4, 5)], 1)).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.softmax(torch.randn(4, 9, generator=g), -1)
    base = uld_loss(logits, t).item()
    assert base > 0.05
    assert uld_loss(logits[:, perm], t[:, torch.randperm(9, generator=g)]).item() == pytest.approx(base, abs=1e-6)
    # The gradient reaches the student's logits
    z = logits.clone().requires_grad_(True)
    uld_loss(z, t).backward()
    assert z.grad.abs().sum() > 0


def test_uld_bad_input_raises():
    with pytest.raises(ValueError, match="positions differ"):
        uld_loss(torch.zeros(2, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="temperature"):
        uld_loss(torch.zeros(1, 3), torch.zeros(1, 3), temperature=0)
    assert uld_loss(torch.zeros(0, 3), torch.zeros(0, 2)).item() == 0.0
