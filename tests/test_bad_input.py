"""Every bad input of design.md §2 raises ValueError/TypeError naming the argument."""
import pytest
import torch

import tike_cuda

V = 50


@pytest.fixture
def z():
    return torch.randn(3, V)


@pytest.fixture
def zr():
    return torch.randn(3, V)


def test_logits_not_a_tensor(zr):
    with pytest.raises(TypeError, match="logits"):
        tike_cuda.topk_kl([[1.0, 2.0]], zr)


def test_logits_wrong_dtype(zr):
    with pytest.raises(TypeError, match="logits"):
        tike_cuda.topk_kl(torch.zeros(3, V, dtype=torch.float64), zr)


def test_logits_rank_zero(zr):
    with pytest.raises(ValueError, match="logits"):
        tike_cuda.full_kl(torch.tensor(1.0), torch.tensor(1.0))


def test_logits_empty_vocab():
    with pytest.raises(ValueError, match="logits"):
        tike_cuda.token_logprobs(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))


def test_ref_wrong_shape(z):
    with pytest.raises(ValueError, match="ref_logits"):
        tike_cuda.topk_kl(z, torch.randn(3, V + 1))


def test_ref_wrong_dtype(z):
    with pytest.raises(TypeError, match="ref_logits"):
        tike_cuda.full_kl(z, torch.randn(3, V).bfloat16())


def test_ref_wrong_device(z):
    with pytest.raises(ValueError, match="ref_logits"):
        tike_cuda.topk_kl(z, torch.randn(3, V, device="meta"))


@pytest.mark.parametrize("k", [0, -1, V + 1])
def test_k_out_of_range(z, zr, k):
    with pytest.raises(ValueError, match="k must"):
        tike_cuda.topk_kl(z, zr, k)


@pytest.mark.parametrize("k", [2.0, True, "16"])
def test_k_not_an_int(z, zr, k):
    with pytest.raises(TypeError, match="k must"):
        tike_cuda.topk_kl(z, zr, k)


@pytest.mark.parametrize("bad", [[-1, 0, 0], [0, V, 0]])
def test_token_out_of_range(z, zr, bad):
    with pytest.raises(ValueError, match="sampled_tokens"):
        tike_cuda.topk_kl(z, zr, sampled_tokens=torch.tensor(bad))
    with pytest.raises(ValueError, match="tokens"):
        tike_cuda.token_logprobs(z, torch.tensor(bad))


def test_tokens_wrong_shape_or_dtype(z, zr):
    with pytest.raises(ValueError, match="sampled_tokens"):
        tike_cuda.topk_kl(z, zr, sampled_tokens=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="sampled_tokens"):
        tike_cuda.topk_kl(z, zr, sampled_tokens=torch.zeros(3))


def test_tokens_missing():
    with pytest.raises(ValueError, match="tokens"):
        tike_cuda.token_logprobs(torch.randn(3, V), None)


def test_old_logprobs_without_sampled_tokens(z, zr):
    with pytest.raises(ValueError, match="old_logprobs"):
        tike_cuda.topk_kl(z, zr, old_logprobs=torch.zeros(3))


def test_old_logprobs_wrong_shape(z, zr):
    with pytest.raises(ValueError, match="old_logprobs"):
        tike_cuda.topk_kl(z, zr, sampled_tokens=torch.zeros(3, dtype=torch.long),
                          old_logprobs=torch.zeros(2))


def test_unknown_tail(z, zr):
    with pytest.raises(ValueError, match="tail"):
        tike_cuda.topk_kl(z, zr, tail="merged")


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(z, zr, t):
    with pytest.raises(ValueError, match="temperature"):
        tike_cuda.topk_kl(z, zr, temperature=t)


def test_mask_wrong_dtype_or_shape(z, zr):
    with pytest.raises(TypeError, match="mask must be a bool tensor, or an integer or floating"):
        tike_cuda.full_kl(z, zr, mask=torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="mask must be a bool tensor.*got the value 0.5"):
        tike_cuda.full_kl(z, zr, mask=torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="mask must be a bool tensor.*got the value 2"):
        tike_cuda.token_logprobs(z, torch.zeros(3, dtype=torch.long), mask=torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="mask must have shape"):
        tike_cuda.topk_kl(z, zr, mask=torch.ones(3, 1, dtype=torch.bool))


def test_flags_must_be_bool(z, zr):
    with pytest.raises(TypeError, match="return_stats"):
        tike_cuda.topk_kl(z, zr, return_stats=1)
    with pytest.raises(TypeError, match="union_sampled"):
        tike_cuda.topk_kl(z, zr, union_sampled="yes")


def test_raw_op_backstop(z, zr):
    """Direct calls of torch.ops.tike_cuda.* are checked in C++ too: an error, not a crash."""
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.tike_cuda.topk_kl(z, zr, 0, None, None, None, 1.0, True, False)
    with pytest.raises(RuntimeError, match="sampled_tokens"):
        torch.ops.tike_cuda.topk_kl(z, zr, 4, torch.tensor([0, 1, 99]), None, None, 1.0, True, False)
