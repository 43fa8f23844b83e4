"""tike_cuda: the Top-k Importance-weighted KL Estimator (TIKE) as fused CPU/CUDA kernels.

    import tike_cuda
    kl = tike_cuda.topk_kl(logits, ref_logits, k=16, sampled_tokens=tokens,
                           old_logprobs=old_logprobs, mask=response_mask)   # [B, T]

Ops are registered once (TORCH_LIBRARY(tike_cuda)) and work under torch.compile.
"""
import warnings

import torch

from . import _C  # loads the kernels and registers torch.ops.tike_cuda.*
from . import grpo
from .estimators import kl_penalty, per_token_kl
from .full_kl import full_kl
from .reference import TopkStats
from .sparse import SparseReference, sparse_reference, topk_indices
from .token_logprobs import token_logprobs
from .topk_kl import topk_kl
from .fused_linear import FusedLinearGRPOLoss, fused_linear_grpo_loss
from . import distributed  # vocabulary-parallel ops (tike_cuda.distributed.vocab_parallel_*)

__version__ = "0.1.0"
__all__ = ["topk_kl", "full_kl", "token_logprobs", "kl_penalty", "per_token_kl", "TopkStats",
           "grpo", "built_with_cuda", "cpu_isa", "cpu_isas", "topk_indices", "sparse_reference",
           "SparseReference", "distributed", "cpu_grad_cache_info", "empty_cpu_grad_cache"]


def built_with_cuda() -> bool:
    """Whether this build carries the CUDA kernels (decided by nvcc at build time)."""
    return bool(_C.WITH_CUDA)


def cpu_isa() -> str:
    """The instruction-set path the CPU kernels run: "avx512", "avx2", or the baseline
    ("sse2" on x86-64, "neon" on aarch64). Chosen at import: the best this CPU runs, or the
    one named by the environment variable ``TIKE_CPU_ISA`` (avx512, avx2, sse2, auto)."""
    return _C.CPU_ISA


def cpu_isas() -> tuple:
    """Every CPU path this machine can run, best first (what ``TIKE_CPU_ISA`` may name)."""
    return tuple(s.strip() for s in _C.CPU_ISAS.split(",") if s.strip())


def cpu_grad_cache_info() -> dict:
    """The cache of CPU gradient buffers: the backwards' [N, V] gradients come from it.

    A fresh buffer of that size is mapped and zeroed by the OS a page at a time on first
    touch, which costs more than computing the gradient; a training loop frees the
    gradient of the logits within its backward, so the next step takes the same mapped
    memory back (as CUDA's caching allocator does). Buffers of 1 MiB and more are kept once
    no tensor uses them, up to ``cap_bytes`` of idle memory (``TIKE_CPU_GRAD_CACHE_MB``,
    read at import, default 2048; 0 turns the cache off). Returns ``idle_blocks``,
    ``idle_bytes`` (held now, unused), ``hits`` and ``misses`` (requests served from the
    cache and by fresh memory) and ``cap_bytes``.
    """
    keys = ("idle_blocks", "idle_bytes", "hits", "misses", "cap_bytes")
    return dict(zip(keys, _C.cpu_grad_cache_info()))


def empty_cpu_grad_cache() -> None:
    """Returns the idle CPU gradient buffers (``cpu_grad_cache_info``) to the OS."""
    _C.cpu_grad_cache_clear()


def _check_cuda_match() -> None:
    # An extension built against one CUDA major and loaded beside a torch of another fails
    # in obscure ways at the first launch; say so at import instead.
    if not _C.WITH_CUDA or torch.version.cuda is None:
        return
    ext_major = _C.CUDA_VERSION // 1000
    torch_major = int(torch.version.cuda.split(".")[0])
    if ext_major != torch_major:
        warnings.warn(f"tike_cuda was built with CUDA {ext_major}.x but torch uses CUDA "
                      f"{torch.version.cuda}: rebuild tike_cuda against this torch", stacklevel=2)


_check_cuda_match()
