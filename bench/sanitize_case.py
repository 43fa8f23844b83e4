"""A small run of every CUDA kernel path, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python bench/sanitize_case.py

Paths: one CTA per row and split rows (few rows of a long vocabulary), odd V (misaligned
rows), a strided [B, T, V] view, k above the register selection (sorted path), the
in-place backward, masks, fp32 and bf16; the fixed-support ops (topk_indices,
sparse_reference, topk_kl_sparse and its backward) and topk_kl_shard. Sizes are tiny: the tools slow kernels down a lot.
"""
import torch

import tike_cuda  # noqa: F401  (registers torch.ops.tike_cuda)

OPS = torch.ops.tike_cuda


def run(N, V, k, dtype, strided=False):
    g = torch.Generator(device="cuda").manual_seed(N * 7919 + V)
    shape = (N, V + 3) if strided else (N, V)
    z = (torch.randn(shape, generator=g, device="cuda") * 3).to(dtype)
    zr = (torch.randn(shape, generator=g, device="cuda") * 3).to(dtype)
    if strided:
        z, zr = z[:, 1:V + 1], zr[:, 2:V + 2]
    tok = torch.randint(0, V, (N,), generator=g, device="cuda")
    old = torch.randn(N, generator=g, device="cuda") - 2
    mask = torch.rand(N, generator=g, device="cuda") > 0.25
    out, lse, idx, coef, shift, _ = OPS.topk_kl(z, zr, k, tok, old, mask, 0.8, True, True)
    go = torch.randn(N, generator=g, device="cuda")
    OPS.topk_kl_backward(go, z, lse, idx, coef, shift, mask, 0.8)
    buf = z.clone() if strided else z.clone().contiguous()
    OPS.topk_kl_backward_(go, buf, lse, idx, coef, shift, mask, 0.8)
    fo, lp, lq = OPS.full_kl(z, zr, mask, 0.8)
    OPS.full_kl_backward(go, z, zr, fo, lp, lq, mask, 0.8)
    logp, ent, lse_t = OPS.token_logprobs(z, tok, 0.8, True)
    OPS.token_logprobs_backward(go, go, z, tok, lse_t, ent, 0.8)
    # The sparse reference: the support from the policy, the reference on S~, TIKE on it.
    support = OPS.topk_indices(z, min(k, V), mask)
    sidx, slp, stail = OPS.sparse_reference(zr, support, tok, mask, 0.8)
    so, slse, scoef, sshift, _ = OPS.topk_kl_sparse(z, sidx, slp, stail, tok, old, mask, 0.8, True)
    OPS.topk_kl_backward(go, z, slse, sidx, scoef, sshift, mask, 0.8)
    # The vocabulary-parallel local pass: a token of -1 is on another shard.
    OPS.topk_kl_shard(z, zr, min(k, V), torch.where(tok % 3 == 0, -1, tok), mask, 0.8, True)
    torch.cuda.synchronize()


def main():
    for dtype in (torch.float32, torch.bfloat16):
        run(5, 4099, 16, dtype)           # one CTA per row, odd V
        run(2, 40000, 64, dtype)          # split rows + combine kernel
        run(3, 1000, 300, dtype)          # k above the register selection
        run(4, 257, 256, dtype, strided=True)
        run(3, 1, 1, dtype)
    print("sanitize_case: done")


if __name__ == "__main__":
    main()
