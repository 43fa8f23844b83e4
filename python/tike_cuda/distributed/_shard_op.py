"""Registration of ``torch.ops.tike_cuda.topk_kl_shard``, the local pass of
:func:`vocab_parallel_topk_kl` (schema in csrc/ops.cpp, contract in docs/kernels.md): its
fake kernel, and an error instead of autograd's silent zero if it is differentiated (it
is called on detached tensors inside the vocabulary-parallel op's own autograd.Function)."""
from __future__ import annotations

import torch

from ..topk_kl import _topk_kl_fake


@torch.library.register_fake("tike_cuda::topk_kl_shard")
def _topk_kl_shard_fake(logits, ref_logits, k, sampled_tokens, mask, temperature, tail_bucket):
    # idx and the lse pair as topk_kl's fake kernel shapes them (one place knows them).
    _, lse, idx, _, _, _ = _topk_kl_fake(logits, ref_logits, k, sampled_tokens, None, mask,
                                         temperature, True, tail_bucket)
    N, K1 = idx.shape
    return (idx, logits.new_empty(N, K1, 2, dtype=torch.float32), lse, torch.empty_like(lse),
            torch.empty_like(lse))


def _no_derivative(ctx, *grads):
    raise RuntimeError("tike_cuda::topk_kl_shard has no derivative of its own: differentiate "
                       "tike_cuda.distributed.vocab_parallel_topk_kl instead")


torch.library.register_autograd("tike_cuda::topk_kl_shard", _no_derivative,
                                setup_context=lambda ctx, inputs, output: None)
