"""GRPO helpers: advantages (Eq. 7), clipped surrogate (Eq. 8), aggregation, loss (Eq. 9)."""
import math

import pytest
import torch

from tike_cuda.grpo import aggregate, clipped_surrogate, group_advantages, grpo_loss


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    s = math.sqrt(4 * 0.25 / 3)  # unbiased std of {1, 0, 0, 1}
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6)
    torch.testing.assert_close(a[:4], want)
    assert a[4:].eq(0).all()


def test_zero_variance_group_is_exactly_zero():
    r = torch.tensor([0.1] * 3 + [0.7] * 3, dtype=torch.float64)
    a = group_advantages(r, 3)
    assert not a.isnan().any() and a.eq(0).all()
    assert group_advantages(torch.tensor([1.0, 2.0]), 1).eq(0).all()


def test_group_advantages_options_and_errors():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0])
    torch.testing.assert_close(group_advantages(r, 2, norm_by_std=False),
                               torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r.view(2, 2), 2)


def test_clipped_surrogate_by_hand():
    lp = torch.log(torch.tensor([1.5, 0.5, 1.0, 1.3]))
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0])
    got = clipped_surrogate(lp, torch.zeros(4), adv, clip_eps=0.2)
    torch.testing.assert_close(got, torch.tensor([1.2, -0.8, 2.0, -1.3]))
    got = clipped_surrogate(lp, torch.zeros(4), adv, clip_eps=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(got, torch.tensor([1.28, -0.8, 2.0, -1.3]))


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("mode,want", [("token-mean", 7 / 3),
                                       ("token-sum", 7.0),
                                       ("seq-mean-token-mean", (1.5 + 4.0) / 2),
                                       ("seq-mean-token-sum", (3.0 + 4.0) / 2),
                                       ("seq-mean-token-sum-norm", (3.0 + 4.0) / 2 / 3)])
def test_aggregate_modes(mode, want):
    """verl's agg_loss on one rank (dp_size 1): the values worked out by hand."""
    for mask in (MASK, MASK.float(), MASK.long(), MASK.int()):  # every mask dtype, one rule
        assert aggregate(LOSS, mask, mode).item() == pytest.approx(want)
    assert aggregate(LOSS, torch.zeros_like(MASK), mode).item() == 0.0


def test_token_sum_norm_scale_factor():
    got = aggregate(LOSS, MASK, "seq-mean-token-sum-norm", loss_scale_factor=7.0)
    assert got.item() == pytest.approx((3.0 + 4.0) / 2 / 7.0)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="mode must be one of .*'token-sum'"):
        aggregate(LOSS, MASK, "token-median")
    with pytest.raises(ValueError, match="mask"):
        aggregate(LOSS, MASK[:2], "token-mean")
    with pytest.raises(ValueError, match="mask must be a bool tensor, or an integer or floating"):
        aggregate(LOSS, MASK.float() * 0.5, "token-mean")


def test_group_size_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(group_advantages(r, np.int64(2)), group_advantages(r, 2))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, True)


def test_grpo_loss_matches_formula_and_backprops():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g)
    lp = (old + 0.3 * torch.randn(4, 5, generator=g)).requires_grad_()
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    kl = torch.rand(4, 5, generator=g)
    mask = torch.rand(4, 5, generator=g) > 0.3
    for mode in ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                 "seq-mean-token-sum-norm"):
        loss, metrics = grpo_loss(lp, old, adv, kl, mask, beta=0.1, loss_agg_mode=mode)
        surr = clipped_surrogate(lp, old, adv[:, None])
        want = aggregate(-(surr - 0.1 * kl), mask, mode)
        torch.testing.assert_close(loss, want)
        assert set(metrics) >= {"loss", "pg_loss", "kl", "clipfrac", "ratio_mean", "approx_kl"}
        assert all(not m.requires_grad for m in metrics.values())
    loss.backward()
    assert lp.grad is not None and lp.grad[~mask].eq(0).all()


def test_grpo_loss_without_kl():
    lp = torch.zeros(2, 3)
    loss, m = grpo_loss(lp, lp, torch.tensor([1.0, -1.0]), None, torch.ones(2, 3), beta=0.0)
    assert loss.item() == 0.0 and m["kl"].item() == 0.0 and m["clipfrac"].item() == 0.0
    with pytest.raises(ValueError, match="kl"):
        grpo_loss(lp, lp, torch.tensor([1.0, -1.0]), None, torch.ones(2, 3), beta=0.1)
