"""tike_cuda against eager PyTorch on every CPU instruction-set path of this machine.

    python bench/cpu_paths.py                       # all paths this CPU runs, N = 256, V = 151,936
    python bench/cpu_paths.py --paths avx2 --ops topk_kl --dtypes fp32 --ks 16

Each path runs in a child process (TIKE_CPU_ISA=<path>: the path is fixed at import) that
times forward + backward of tike_cuda and of the eager baseline (tike_cuda.bench's cases and
inputs) *interleaved*, call by call, so that both see the same machine load; the copy
bandwidth for the byte floor is measured in the same child. Reports the median wall time
per provider, the ratio eager / tike_cuda (median of the per-pair ratios), the byte floor
and the process's user and system CPU time per call (all threads): on a shared machine
the user time is perturbed less than the wall time, and the system time is the page
faults of fresh [N, V] buffers (the gradient; eager's intermediates).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(args) -> None:
    import torch

    import tike_cuda
    from tike_cuda import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    copy_bw = bench.copy_bandwidth(bench.Timer(device), 512 << 20)
    env = bench.environment(device)
    for dtype in args.dtypes.split(","):
        cases = bench.make_cases([(args.ops.split(","), [args.N], [args.V],
                                   [int(k) for k in args.ks.split(",")], [dtype])], ["fwdbwd"])
        inp = bench.make_inputs(args.N, args.V, bench.DTYPES[dtype], device)
        for case in cases:
            calls = {p: bench.build_call(p, case, inp, device) for p in ("tike_cuda", "eager")}
            for fn in calls.values():  # warm-up
                fn()
            wall = {p: [] for p in calls}
            user = {p: [] for p in calls}
            sys_ = {p: [] for p in calls}
            for _ in range(args.repeats):
                for p, fn in calls.items():
                    w0, t0 = time.perf_counter(), os.times()
                    out = fn()
                    t1 = os.times()
                    wall[p].append(time.perf_counter() - w0)
                    user[p].append(t1.user - t0.user)
                    sys_[p].append(t1.system - t0.system)
                    del out
            ratios = [e / t for e, t in zip(wall["eager"], wall["tike_cuda"])]
            print(json.dumps({
                "path": tike_cuda.cpu_isa(), "host": env["host"], "op": case.op, "N": case.N,
                "V": case.V, "k": case.k, "dtype": case.dtype,
                "tike_ms": 1e3 * statistics.median(wall["tike_cuda"]),
                "eager_ms": 1e3 * statistics.median(wall["eager"]),
                "ratio": statistics.median(ratios),
                "floor_ms": 1e3 * case.nbytes() / copy_bw, "copy_GBps": copy_bw / 1e9,
                "user_s": {p: statistics.median(v) for p, v in user.items()},
                "sys_s": {p: statistics.median(v) for p, v in sys_.items()}}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", help="comma list (default: every path this CPU runs)")
    p.add_argument("--ops", default="topk_kl,full_kl,token_logprobs")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--ks", default="16,256", help="k values of topk_kl")
    p.add_argument("--N", type=int, default=256)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import tike_cuda
    paths = args.paths.split(",") if args.paths else list(tike_cuda.cpu_isas())
    rows = []
    for path in paths:
        cmd = [sys.executable, os.path.abspath(__file__), "--child"] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "paths") and v]
        r = subprocess.run(cmd, env=dict(os.environ, TIKE_CPU_ISA=path), capture_output=True,
                           text=True)
        if r.returncode != 0:
            print(f"{path}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows += [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    print(f"{rows[0]['host']}; copy bandwidth {rows[0]['copy_GBps']:.1f} GB/s (first path)\n")
    print("| path | op | N | V | dtype | k | tike_cuda ms | eager ms | eager / tike | byte floor ms "
          "| tike / floor | user s: tike / eager | sys s: tike / eager |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        u, s = r["user_s"], r["sys_s"]
        print(f"| {r['path']} | {r['op']} | {r['N']} | {r['V']:,} | {r['dtype']} | {r['k'] or '—'} "
              f"| {r['tike_ms']:.0f} | {r['eager_ms']:.0f} | {r['ratio']:.1f}× | {r['floor_ms']:.0f} "
              f"| {r['tike_ms'] / r['floor_ms']:.1f} | {u['tike_cuda']:.2f} / {u['eager']:.2f} "
              f"| {s['tike_cuda']:.2f} / {s['eager']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
