"""The CPU emulation of the CUDA execution model itself (csrc/emu, tike_cuda.testing).

What the CUDA kernel tests rely on: warp operations exchange what a GPU exchanges, kernels
that break the rules (deadlock, divergent warp operations, barriers not reached by every
thread, writes past the dynamic shared memory, > 48 KB without opting in) fail with a
message naming the block, the threads and the source line instead of hanging, a missing
barrier shows up as a result that depends on the thread order, the emulated ops have the
schemas of the CUDA ops, and every kernel gives the same bits in every thread order.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import _load_emulation, make_logits

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def emu():
    testing = _load_emulation()
    yield testing
    testing.set_thread_order("forward", 0)


def _selftest(name):
    return torch.ops.tike_emu.selftest(name)


def test_warp_operations_exchange_as_on_a_gpu(emu):
    got = _selftest("warp_ops").view(2, 64, 8)
    for b in range(2):
        for t in range(64):
            lane, warp = t % 32, t // 32
            v = lambda l: 1000 * b + 32 * warp + l  # noqa: E731
            expected = [v(lane ^ 5), v(3), v(lane - 2 if lane >= 2 else lane),
                        2 * v(lane + 4 if lane + 4 < 32 else lane) + 1,
                        sum(1 << l for l in range(0, 32, 3)), int(warp == 1), 1,
                        2 * sum(1000 * b + i for i in range(64))]
            assert got[b, t].tolist() == expected, (b, t)


@pytest.mark.parametrize("name,message", [
    ("deadlock", r"deadlock_kernel.*block \(0,0,0\) of \(2,1,1\): deadlock: thread 0 wait at "
                 r"__syncthreads \(emu/selftest\.cpp:\d+\); threads 1-31 wait at __shfl_xor_sync "
                 r"\(emu/selftest\.cpp:\d+, mask 0xffffffff\); threads 32-255 wait at __syncthreads"),
    ("partial_barrier", r"__syncthreads \(emu/selftest\.cpp:\d+\) is not reached by every thread: "
                        r"threads 0-127 wait at __syncthreads .*; threads 128-255 exited"),
    ("different_barriers", r"threads wait at different barriers: threads 0-127 wait at "
                           r"__syncthreads \(emu/selftest\.cpp:(\d+)\); threads 128-255 wait at "
                           r"__syncthreads \(emu/selftest\.cpp:(?!\1)\d+\)"),
    ("divergent_warp", r"divergent warp operation in warp \d: thread \d+ wait at __shfl_xor_sync "
                       r"\(emu/selftest\.cpp:(\d+), mask 0xffffffff\), thread \d+ wait at "
                       r"__shfl_xor_sync \(emu/selftest\.cpp:(?!\1)\d+"),
    ("mismatched_mask", r"divergent warp operation in warp 0: .*mask 0x0000ffff"),
    ("partial_warp", r"(threads 0-15 wait at __shfl_xor_sync .*; threads 16-31 exited|"
                     r"thread (1[6-9]|2\d|3[01]) exited before joining __shfl_xor_sync)"),
])
@pytest.mark.parametrize("order", ["forward", "reversed", "shuffled"])
def test_broken_kernels_fail_with_a_clear_message(emu, name, message, order):
    emu.set_thread_order(order, seed=5)
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure: tike_cuda emulation") as e:
        _selftest(name)
    assert re.search(message, str(e.value)), str(e.value)
    # The failure is reported once; the next launch runs normally.
    assert _selftest("block_sum:1").item() == 256 * 257 // 2


def test_dynamic_shared_memory_is_poisoned_and_bounds_checked(emu):
    first, total = _selftest("dyn_smem:1000:-1").tolist()
    assert first == 0xff and total == 1000  # read before written: the poison
    assert _selftest("dyn_smem:1000:999").tolist() == [0xff, 1001]
    with pytest.raises(RuntimeError, match=r"wrote past the 1000 bytes of dynamic shared memory "
                                           r"of the launch \(at byte 1003\)"):
        _selftest("dyn_smem:1000:1003")


def test_more_than_48kb_needs_the_opt_in(emu):
    assert _selftest(f"dyn_smem:{48 * 1024}:-1").tolist() == [0xff, 48 * 1024]
    with pytest.raises(RuntimeError, match=r"cudaErrorInvalidValue: .*dyn_smem_kernel.*asks for "
                                           r"49153 bytes .*without opting in"):
        _selftest(f"dyn_smem:{48 * 1024 + 1}:-1")
    big = 227 * 1024
    assert _selftest(f"dyn_smem:{big}:-1:optin={big}").tolist() == [0xff, big]
    with pytest.raises(RuntimeError, match=r"above its opt-in of 100000 bytes"):
        _selftest("dyn_smem:100001:-1:optin=100000")
    with pytest.raises(RuntimeError, match=r"at most 232448 bytes per block"):
        _selftest(f"dyn_smem:16:-1:optin={big + 1}")


def test_device_attributes_are_an_h200s(emu):
    # device, SMs, opt-in shared memory per block, and what the kernels' planner reads
    assert _selftest("attributes").tolist() == [0, 132, 232448, 132]


def test_a_missing_barrier_shows_up_in_the_thread_order(emu):
    """Without its __syncthreads, thread 0 sums before the others wrote (forward order) or
    after (reversed): the result depends on the order, which is what the orders are for."""
    full = 256 * 257 // 2
    for order in ("forward", "reversed", "shuffled"):
        emu.set_thread_order(order, seed=11)
        assert _selftest("block_sum:3").item() == 3 * full
    racy = {}
    for salt, order in enumerate(("forward", "reversed", "shuffled"), start=5):
        emu.set_thread_order(order, seed=11)
        racy[order] = _selftest(f"block_sum_racy:{salt}").item() / salt
    assert racy["reversed"] == full
    assert racy["forward"] != full and racy["shuffled"] != full


def test_thread_order_is_validated(emu):
    with pytest.raises(ValueError, match="order must be one of"):
        emu.set_thread_order("backwards")
    with pytest.raises(ValueError, match="order must be one of"):
        emu.emulated_cuda("random")


def test_emulated_ops_have_the_cuda_schemas(emu):
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tike_cuda::")]
    assert len(names) >= 7
    for name in names:
        op = name.split("::")[1]
        cuda = getattr(torch.ops.tike_cuda, op).default._schema
        emul = getattr(torch.ops.tike_cuda_emu, op).default._schema
        assert str(emul) == str(cuda).replace("tike_cuda::", "tike_cuda_emu::", 1)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tike_cuda_emu::{op}", "CPU"), op


def _all_paths(gen):
    """Every kernel and path once, small: (N, V, k) of the plain, split-row (combine kernels)
    and k > 256 (preselected) paths, with sampled tokens, masks, NaN and -inf."""
    out = {}
    for N, V, k in [(5, 999, 16), (2, 9000, 8), (3, 700, 300)]:
        z = make_logits((N, V), torch.bfloat16, "cpu", generator=gen)
        zr = make_logits((N, V), torch.bfloat16, "cpu", generator=gen)
        z[0, 3] = float("nan")
        z[1, : V // 2] = float("-inf")
        tok = torch.randint(0, V, (N,), generator=gen)
        old = torch.randn(N, generator=gen) - 2
        mask = torch.ones(N, dtype=torch.bool)
        mask[-1] = False
        ops = torch.ops.tike_cuda_emu
        fwd = ops.topk_kl(z, zr, k, tok, old, mask, 0.8, True, True)
        g = torch.randn(N, generator=gen)
        bwd = ops.topk_kl_backward(g, z, *fwd[1:5], mask, 0.8)
        fk = ops.full_kl(z, zr, mask, 0.8)
        fkb = ops.full_kl_backward(g, z, zr, *fk, mask, 0.8)
        tl = ops.token_logprobs(z, tok, 0.8, True)
        tlb = ops.token_logprobs_backward(g, g, z, tok, tl[2], tl[1], 0.8)
        out[(N, V, k)] = (*fwd, bwd, *fk, fkb, *tl, tlb)
    return out


def test_kernels_give_the_same_bits_in_every_thread_order(emu):
    """The kernels reduce in a fixed order: any dependence on the thread order would be a
    race (a missing barrier or __syncwarp)."""
    runs = []
    for order, seed in (("forward", 0), ("reversed", 0), ("shuffled", 1), ("shuffled", 2)):
        emu.set_thread_order(order, seed)
        runs.append(_all_paths(torch.Generator().manual_seed(42)))
    for case in runs[0]:
        for i, ref in enumerate(runs[0][case]):
            for r in runs[1:]:
                assert torch.equal(ref.isnan(), r[case][i].isnan()), (case, i)
                assert torch.equal(ref.nan_to_num(), r[case][i].nan_to_num()), (case, i)


def test_emulated_cuda_routes_the_public_api_below_autograd(emu, gen):
    import tike_cuda
    z = make_logits((3, 200), torch.float32, "cpu", generator=gen, requires_grad=True)
    zr = make_logits((3, 200), torch.float32, "cpu", generator=gen)
    emu.reset_counters()
    with emu.emulated_cuda("reversed"):
        out = tike_cuda.full_kl(z, zr)
        (grad,) = torch.autograd.grad(out.sum(), z)
    assert emu.counters()["launches"] == 2  # forward and backward kernels ran emulated
    (cpu_grad,) = torch.autograd.grad(tike_cuda.full_kl(z, zr).sum(), z)
    torch.testing.assert_close(grad, cpu_grad, rtol=1e-5, atol=1e-6)
    assert emu.counters()["launches"] == 2  # outside the context: the CPU kernels


def test_the_package_ships_the_emulation_sources(tmp_path):
    """`pip install .` copies what load_emulated() compiles into the package (_csrc)."""
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, env={**__import__("os").environ, "TIKE_CUDA": "0"})
    shipped = tmp_path / "tike_cuda" / "_csrc"
    for rel in ("emu/ops_emu.cpp", "emu/runtime.cpp", "emu/fiber.cpp", "emu/selftest.cpp",
                "emu/cuda_emu.h", "cuda/ops_glue.h", "kernels/topk_kl.cuh", "kernels/common.cuh",
                "kernels/row_layout.h", "ops_prepare.h", "ops_common.h"):
        assert (shipped / rel).is_file(), rel
