"""A tiny GRPO run on the CPU: k3 vs TIKE as the KL penalty, with the exact KL logged beside.

Task (verifiable): the prompt is a target T in [0, 27]; the policy answers with three
tokens and is rewarded when they are digits summing to T:

    reward = 1 - min(|d1 + d2 + d3 - T|, 10) / 10     (0 if any token is not a digit)

The vocabulary has 10 digit tokens and 22 filler tokens. The policy is a small GRU LM
conditioned on T. The reference is the policy after a short "SFT" on digit strings
drawn from a Zipf law over the digits (so it speaks digits, peaked, but ignores T);
RL starts from it, as in practice.

Each step samples G responses per prompt from pi_old (the current policy), computes the
group advantages (Eq. 7), and takes ``--ppo-epochs`` updates of the GRPO loss (Eq. 9)
with the chosen per-token KL estimate, the later epochs off-policy (r != 1). The log
shows, per step, the token-mean exact KL(pi_theta || pi_ref) next to the estimate the
loss used.

    python examples/grpo_toy.py --steps 100
"""
import argparse
import copy
import time

import torch
from torch import nn

import tike_cuda
from tike_cuda.grpo import grpo_loss, group_advantages

VOCAB, DIGITS, LENGTH, TARGETS = 32, 10, 3, 28


class TinyLM(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.tok = nn.Embedding(VOCAB + 1, hidden)  # the last id is BOS
        self.tgt = nn.Embedding(TARGETS, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, target, prefix):
        """Next-token logits [B, t, V] for every prefix position (prefix starts with BOS)."""
        out, _ = self.rnn(self.tok(prefix), self.tgt(target)[None])
        return self.head(out)


def _prefix(tokens):
    bos = torch.full((tokens.shape[0], 1), VOCAB, dtype=torch.long)
    return torch.cat([bos, tokens[:, :-1]], dim=1)


@torch.no_grad()
def sample(model, target, gen):
    tokens = torch.zeros(target.shape[0], 0, dtype=torch.long)
    for _ in range(LENGTH):
        prefix = torch.cat([torch.full((target.shape[0], 1), VOCAB), tokens], dim=1)
        probs = torch.softmax(model(target, prefix)[:, -1].double(), -1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return tokens


def reward(tokens, target):
    digits = (tokens < DIGITS).all(dim=1)
    err = (tokens.sum(dim=1) - target).abs().clamp(max=10).float()
    return torch.where(digits, 1.0 - err / 10.0, torch.zeros_like(err))


def sft_reference(seed, steps=150):
    """A reference that emits Zipf-distributed digits whatever the target."""
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, DIGITS + 1, dtype=torch.float64)
    for _ in range(steps):
        target = torch.randint(0, TARGETS, (256,), generator=gen)
        tokens = torch.multinomial(zipf, 256 * LENGTH, replacement=True, generator=gen)
        tokens = tokens.view(256, LENGTH)
        logits = model(target, _prefix(tokens))
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def train(args, estimator, reference):
    torch.manual_seed(args.seed)
    policy = copy.deepcopy(reference).requires_grad_(True)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    print(f"\n== GRPO with KL estimator {estimator!r}"
          + (f" (k={args.k})" if estimator.startswith("tike") else "") + f", beta={args.beta}")
    print(f"{'step':>4} {'reward':>7} {'solved':>6} {'KL exact':>9} {'KL est':>9} {'|err|':>8}")
    history = []
    for step in range(1, args.steps + 1):
        target = torch.randint(0, TARGETS, (args.prompts,), generator=gen)
        target = target.repeat_interleave(args.group)
        tokens = sample(policy, target, gen)
        r = reward(tokens, target)
        adv = group_advantages(r, args.group)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        with torch.no_grad():
            old_lp = tike_cuda.token_logprobs(policy(target, _prefix(tokens)), tokens)
            ref_logits = reference(target, _prefix(tokens))
        for _ in range(args.ppo_epochs):
            logits = policy(target, _prefix(tokens))
            lp = tike_cuda.token_logprobs(logits, tokens)
            kl = tike_cuda.per_token_kl(logits, ref_logits, estimator, sampled_tokens=tokens,
                                        old_logprobs=old_lp, k=args.k)
            loss, m = grpo_loss(lp, old_lp, adv, kl, mask, beta=args.beta)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                exact = tike_cuda.full_kl(logits, ref_logits).mean().item()
        est = m["kl"].item()
        solved = (r == 1).float().mean().item()
        history.append((r.mean().item(), solved, exact, est))
        if step % args.log_every == 0 or step == args.steps:
            print(f"{step:>4} {r.mean().item():>7.3f} {solved:>6.2f} {exact:>9.2e} {est:>9.2e}"
                  f" {abs(est - exact):>8.1e}")
    return history


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--prompts", type=int, default=32, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="responses per prompt (G)")
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1, help="KL coefficient")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--k", type=int, default=4, help="TIKE top-k (the vocabulary has 32)")
    ap.add_argument("--estimators", default="k3,tike", help="comma-separated, run in order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    reference = sft_reference(args.seed).requires_grad_(False)  # frozen
    results = {}
    for est in args.estimators.split(","):
        results[est] = train(args, est.strip(), reference)
    tail = max(1, args.steps // 5)
    print(f"\nSummary (means over the last {tail} steps; |err| over all steps):")
    print(f"{'estimator':>10} {'reward':>7} {'solved':>6} {'KL exact':>9} {'mean |est - exact|':>19}")
    for est, h in results.items():
        last = h[-tail:]
        mean = [sum(x[i] for x in last) / len(last) for i in range(3)]
        err = sum(abs(x[3] - x[2]) for x in h) / len(h)
        print(f"{est:>10} {mean[0]:>7.3f} {mean[1]:>6.2f} {mean[2]:>9.2e} {err:>19.2e}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
