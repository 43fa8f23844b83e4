"""The demo: every estimator against the exact KL on synthetic LM-like logits, top-k
coverage, and time and memory of the fused ops against eager PyTorch.

``python -m tike_cuda demo`` runs :func:`run`; the CPU memory figures come from
:func:`memprobe`, one fresh process per provider (``python -m tike_cuda _memprobe``), so
that each measures only its own allocations.

Accuracy section: for the sampled-token estimators the bias is their expectation over
o ~ p, summed exactly over the vocabulary (no Monte-Carlo noise), minus the exact KL; for
the dense ones it is the mean over positions of estimate − KL. Spread and max |err| are
over positions, on the drawn tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import tike_cuda

from . import eager
from .estimators import ESTIMATORS, SAMPLED_ESTIMATORS, kl_penalty, per_token_kl
from .measure import Timer, peak_extra_mib, percentile
from .synthetic import synthetic_batch

__all__ = ["run", "memprobe", "expected_sampled"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _table(headers, rows):
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
        if j == 0:
            print("  " + "  ".join("-" * x for x in w))


def expected_sampled(z, zr, kinds, chunk=32):
    """Per-row E_{o ~ p}[kl_penalty(log p_o, log q_o, kind)], summed exactly over the
    vocabulary in float64: the sampled estimators' expectation without Monte-Carlo noise."""
    out = {kind: [] for kind in kinds}
    for s in range(0, z.shape[0], chunk):
        lp = torch.log_softmax(z[s:s + chunk].double(), -1)
        lq = torch.log_softmax(zr[s:s + chunk].double(), -1)
        p = lp.exp()
        for kind in kinds:
            out[kind].append((p * kl_penalty(lp, lq, kind)).sum(-1).cpu())
    return {kind: torch.cat(v) for kind, v in out.items()}


def _accuracy(z, zr, tok, old, k):
    with torch.no_grad():
        exact = tike_cuda.full_kl(z, zr).double().cpu()
        _, st = tike_cuda.topk_kl(z, zr, k, return_stats=True)
        _, ent = tike_cuda.token_logprobs(z, tok, return_entropy=True)
        in_topk = (torch.topk(z, k, dim=-1).indices == tok[:, None]).any(-1).double().cpu()
        m = st.topk_mass.double().cpu()
        print(f"\nTop-{k} coverage m_{k} = sum of the policy's top-{k} probabilities:")
        q = torch.quantile(m, torch.tensor([0.05, 0.5], dtype=torch.float64))
        print(f"  mean {m.mean():.4f}  median {q[1]:.4f}  p5 {q[0]:.4f}  "
              f"m >= 0.99: {(m >= 0.99).double().mean():.1%}  m < 0.90: {(m < 0.9).double().mean():.1%}")
        print(f"  sampled token in top-{k}: {in_topk.mean():.1%}  mean policy entropy "
              f"{ent.double().mean():.2f} nats")
        expect = expected_sampled(z, zr, SAMPLED_ESTIMATORS)
        r_dev = (tike_cuda.token_logprobs(z, tok).double() - old.double()).exp().sub(1).abs()
        r_dev = r_dev.mean().item()
        kl_mean = exact.mean().item()
        rows = []
        for name in ESTIMATORS:
            est = per_token_kl(z, zr, name, sampled_tokens=tok, k=k,
                               old_logprobs=old if name.startswith("tike") else None).double().cpu()
            err = est - exact
            bias = (expect[name] - exact).mean().item() if name in SAMPLED_ESTIMATORS \
                else err.mean().item()
            label = f"{name} (k={k})" if name.startswith("tike") else name
            rows.append([label, f"{est.mean():.3e}", f"{bias:+.2e}", f"{bias / kl_mean:+.1%}",
                         f"{err.std():.2e}", f"{err.abs().max():.2e}"])
    print(f"\nPer-token estimates vs the exact KL (mean exact KL {kl_mean:.3e} per token):")
    _table(["estimator", "mean", "bias", "bias/KL", "spread", "max |err|"], rows)
    print("  bias: mean over positions of E[estimate] - KL; for the sampled-token estimators\n"
          "        E is over o ~ p, summed exactly over the vocabulary (no sampling noise).\n"
          "  spread: std over positions of (estimate - KL) on the drawn tokens; max |err| likewise.\n"
          f"  tike uses the rollout log-probs: importance weight r = exp(log p(o) - old_logprob),\n"
          f"  mean |r - 1| = {r_dev:.1%} here.")


def _providers(zr, tok, old, k):
    return [
        (f"TIKE k={k}", "tike_cuda",
         lambda x: tike_cuda.topk_kl(x, zr, k, sampled_tokens=tok, old_logprobs=old)),
        (f"TIKE k={k}", "eager",
         lambda x: eager.topk_kl(x, zr, k, sampled_tokens=tok, old_logprobs=old)),
        ("exact KL", "tike_cuda", lambda x: tike_cuda.full_kl(x, zr)),
        ("exact KL", "eager", lambda x: eager.full_kl(x, zr)),
        ("k3 (sampled)", "tike_cuda", lambda x: per_token_kl(x, zr, "k3", sampled_tokens=tok)),
        ("k3 (sampled)", "eager", lambda x: kl_penalty(eager.token_logprobs(x, tok),
                                                       eager.token_logprobs(zr, tok), "k3")),
    ]


def _forward_backward(fn, x):
    def once():
        x.grad = None
        fn(x).sum().backward()
    return once


def _perf(z, zr, tok, old, k, device, repeats, memory):
    cuda = device.startswith("cuda")
    timer = Timer(torch.device(device))
    x = z.detach().clone().requires_grad_()
    rows = []
    for op, provider, fn in _providers(zr, tok, old, k):
        once = _forward_backward(fn, x)
        ms = percentile(timer.times_ms(once, warmup=1, repeats=repeats), 0.5)
        peak = peak_extra_mib(once, device) if cuda else None
        x.grad = None
        rows.append([op, provider, f"{ms:.1f}", "" if peak is None else f"{peak:.0f}"])
    del x
    grad_mib = z.numel() * z.element_size() / 2**20
    probes = not cuda and memory and sys.platform.startswith("linux")
    if probes:
        rss = _cpu_memprobes(z, zr, tok, old, k)
        for r in rows:
            if r[0].startswith("TIKE"):
                r[3] = f"{rss[r[1]]:.0f}"
    print(f"\nForward + backward, {z.shape[0]} x {z.shape[1]:,} {str(z.dtype).replace('torch.', '')}"
          f" on {device} (median of {repeats}; gradient buffer alone {grad_mib:.0f} MiB):")
    _table(["op", "provider", "ms", "peak extra MiB"], rows)
    if cuda:
        print("  peak extra MiB: torch.cuda.max_memory_allocated during one forward+backward\n"
              "  minus the memory allocated before it (inputs excluded, gradient included).")
    elif probes:
        print("  peak extra MiB (TIKE rows): growth of the resident set over one forward+backward\n"
              "  (peak RSS, VmHWM reset just before, minus the RSS before) in a fresh process\n"
              "  holding only the inputs; includes the gradient buffer.")


def _cpu_memprobes(z, zr, tok, old, k):
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "inputs.pt")
        torch.save({"logits": z.cpu(), "ref_logits": zr.cpu(), "tokens": tok.cpu(),
                    "old_logprobs": old.cpu()}, data)
        procs = {name: subprocess.Popen([sys.executable, "-m", "tike_cuda", "_memprobe",
                                         "--data", data, "--method", name, "--k", str(k)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in ("tike_cuda", "eager")}
        out = {}
        for name, p in procs.items():
            stdout, stderr = p.communicate()
            if p.returncode:
                raise RuntimeError(f"memory probe {name} failed:\n{stderr}")
            out[name] = json.loads(stdout.strip().splitlines()[-1])["extra_mib"]
    return out


def memprobe(data: str, method: str, k: int) -> float:
    """Peak resident-set growth (MiB) of one TIKE forward+backward by `method` (tike_cuda or
    eager), in this process, which should hold nothing but the inputs in `data`."""
    d = torch.load(data, weights_only=True)
    x = d["logits"].requires_grad_()
    zr, tok, old = d["ref_logits"], d["tokens"], d["old_logprobs"]

    def provider(rows):
        sl = slice(None, rows)
        return {p: f for op, p, f in _providers(zr[sl], tok[sl], old[sl], k)
                if op.startswith("TIKE")}[method]

    small = x.detach()[:2].clone().requires_grad_()
    provider(2)(small).sum().backward()  # page in code and thread pools first
    del small
    return peak_extra_mib(lambda: provider(None)(x).sum().backward(), torch.device("cpu"))


def run(*, rows: int = 256, vocab: int = 151_936, k: int = 16, seed: int = 0,
        dtype: str = "float32", device: str = "cpu", repeats: int | None = None,
        perf: bool = True, memory: bool = True) -> None:
    """Print the demo's report (see the module docstring)."""
    t0 = time.perf_counter()
    if not 1 <= k <= vocab:
        raise ValueError(f"--k must be in [1, --vocab], got {k}")
    d = synthetic_batch(rows, vocab, seed=seed, dtype=DTYPES[dtype], device=device)
    z, zr, tok, old = d["logits"], d["ref_logits"], d["tokens"], d["old_logprobs"]
    threads = "" if device.startswith("cuda") else f", {torch.get_num_threads()} threads"
    if not device.startswith("cuda"):
        import tike_cuda
        threads += (f", CPU path {tike_cuda.cpu_isa()} (TIKE_CPU_ISA; this CPU runs "
                    f"{'/'.join(tike_cuda.cpu_isas())})")
    print(f"tike_cuda demo: {rows} token positions x V = {vocab:,} "
          f"({dtype}), k = {k}, on {device}{threads}")
    print(f"  synthetic LM-like logits (tike_cuda.synthetic, seed {seed}): Zipfian rows of "
          f"varying entropy,\n  reference = perturbed policy, tokens drawn from the policy")
    _accuracy(z, zr, tok, old, k)
    if perf:
        repeats = repeats or (20 if device.startswith("cuda") else 3)
        _perf(z, zr, tok, old, k, device, repeats, memory)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
