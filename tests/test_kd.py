"""KD losses (workers/pipeline/kd.py) against hand-computed numbers."""
import math

import pytest
import torch

from workers.pipeline.kd import soft_label_kd_loss, token_kd_loss

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
