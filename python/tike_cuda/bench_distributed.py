"""Benchmark of vocabulary-parallel TIKE: time and bytes exchanged against all-gathering the
logits and calling ``topk_kl`` on the whole vocabulary.

    python -m tike_cuda.bench_distributed --world 2 --N 256 --V 151936 --dtype bf16
    python -m tike_cuda.bench_distributed --world 8 --device cuda --backend nccl   # 8 GPUs

``--world`` processes (one per GPU with ``--device cuda``) each hold a ``[N, V/world]``
shard of the policy's and the reference's logits. Providers, interleaved repeat by repeat:

- ``vocab_parallel``: :func:`tike_cuda.distributed.vocab_parallel_topk_kl` (with
  ``shard_sizes``: one all-gather of O(N·k) per forward, nothing in the backward).
- ``gather_logits``: all-gather both logits shards into ``[N, V]`` (one collective each),
  ``topk_kl`` on the whole vocabulary, and in the backward this rank's slice of the full
  gradient (the loss is the same on every rank, so no reduction is needed).
- ``local_only``: ``topk_kl`` on the local shard alone, no communication: not the right
  result, only the floor of the shard's own compute.

A step's time is the slowest rank's (max over ranks of each rank's wall time, the ranks
released together by a barrier); the table gives the median over ``--repeats`` steps
after ``--warmup``. Bytes are counted at the collectives (``count_bytes``): ``sent`` is what
each rank contributes, ``gathered`` what each rank ends up holding, per token.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch

PROVIDERS = ("vocab_parallel", "gather_logits", "local_only")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _GatheredVocab(torch.autograd.Function):
    """All-gathers the vocabulary shards into [N, V]; the backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, shard, layout):
        from .distributed import _group
        N, V_i = shard.shape
        ctx.lo, ctx.hi = layout.offset, layout.offset + V_i
        parts = _group.all_gather(shard, layout)                     # [R, N, V_i]
        return parts.permute(1, 0, 2).reshape(N, layout.world * V_i)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.lo:ctx.hi], None


def _step(provider, mode, z, zr, tok, old, args, layout):
    import tike_cuda
    from tike_cuda.distributed import vocab_parallel_topk_kl

    x = z.detach().requires_grad_(mode == "fwdbwd")
    kw = dict(sampled_tokens=tok, old_logprobs=old, tail=args.tail)
    if provider == "vocab_parallel":
        out = vocab_parallel_topk_kl(x, zr, args.k, group=None, shard_sizes=list(layout.sizes),
                                     **kw)
    elif provider == "gather_logits":
        out = tike_cuda.topk_kl(_GatheredVocab.apply(x, layout),
                                _GatheredVocab.apply(zr, layout), args.k, **kw)
    else:
        out = tike_cuda.topk_kl(x, zr, args.k, sampled_tokens=None, tail=args.tail)
    if mode == "fwdbwd":
        out.sum().backward()
        return x.grad
    return out


def _worker(rank, world, init_file, out_file, args):
    import torch.distributed as dist

    from tike_cuda.distributed import _group, count_bytes

    torch.set_num_threads(args.threads)
    device = torch.device(args.device, rank if args.device == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    V_i = args.V // world
    gen = torch.Generator().manual_seed(1234)
    full = lambda: torch.randn(args.N, V_i * world, generator=gen) * 3  # noqa: E731
    sl = slice(rank * V_i, (rank + 1) * V_i)
    dt = DTYPES[args.dtype]
    z, zr = (full()[:, sl].contiguous().to(device=device, dtype=dt) for _ in range(2))
    tok = torch.randint(0, V_i * world, (args.N,), generator=gen).to(device)
    old = (torch.randn(args.N, generator=gen) - 2).to(device)
    layout = _group.ShardLayout(None, rank, (V_i,) * world)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for mode in args.modes.split(","):
        times = {p: [] for p in args.providers.split(",")}
        nbytes = {}
        for rep in range(args.warmup + args.repeats):
            for p in times:
                dist.barrier()
                sync()
                with count_bytes() as c:
                    t0 = time.perf_counter()
                    out = _step(p, mode, z, zr, tok, old, args, layout)
                    sync()
                    dt_ms = (time.perf_counter() - t0) * 1e3
                del out
                slowest = torch.tensor([dt_ms], dtype=torch.float64, device=device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if rep >= args.warmup:
                    times[p].append(slowest.item())
                nbytes[p] = (c.calls, c.sent / args.N, c.gathered / args.N)
        for p, ts in times.items():
            rows.append(dict(provider=p, mode=mode, p50_ms=statistics.median(ts),
                             min_ms=min(ts), max_ms=max(ts), collectives=nbytes[p][0],
                             sent_B_per_token=nbytes[p][1], gathered_B_per_token=nbytes[p][2]))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def run(args) -> list:
    from .distributed._spawn import run_processes

    if args.V % args.world:
        raise SystemExit(f"--V {args.V} must be divisible by --world {args.world}")
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        run_processes(_worker, args.world, (args.world, os.path.join(tmp, "init"), out_file, args),
                      args.timeout)
        with open(out_file) as f:
            return json.load(f)


def table(rows, args) -> str:
    lines = [f"vocab-parallel topk_kl, world {args.world} ({args.backend}, {args.device}), "
             f"N = {args.N}, V = {args.V} ({args.V // args.world} per rank), k = {args.k}, "
             f"{args.dtype}, tail = {args.tail}, with sampled tokens and old log-probs",
             "",
             "| mode | provider | p50 ms | vs vocab_parallel | collectives | sent B/token | "
             "gathered B/token |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for mode in args.modes.split(","):
        ref = next((r["p50_ms"] for r in rows if r["mode"] == mode
                    and r["provider"] == "vocab_parallel"), None)
        for r in rows:
            if r["mode"] != mode:
                continue
            ratio = f"{r['p50_ms'] / ref:.2f}" if ref else "—"
            lines.append(f"| {mode} | {r['provider']} | {r['p50_ms']:.1f} | {ratio} | "
                         f"{r['collectives']} | {r['sent_B_per_token']:,.0f} | "
                         f"{r['gathered_B_per_token']:,.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--N", type=int, default=256)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--tail", choices=("none", "bucket"), default="none")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--backend", default=None, help="gloo (default on the CPU) or nccl")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    print(table(rows, args))


if __name__ == "__main__":
    main()
