"""Run a function in fresh processes with a deadline (the benchmark and the tests start
their own process groups this way: a hang becomes an error, never a wait)."""
from __future__ import annotations

import time


def run_processes(fn, nprocs: int, args: tuple, timeout_s: float) -> None:
    """``fn(rank, *args)`` in `nprocs` spawned processes; raises the first process's
    exception, or TimeoutError after `timeout_s` (the processes are then killed)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} processes did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
