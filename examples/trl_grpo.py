"""TRL's GRPOTrainer with k3 vs TIKE as the KL penalty, the exact KL logged beside: offline, CPU.

A tiny Qwen2 (built in code, saved to a temporary folder: TRL rebuilds the reference from
it) learns to answer "a+b=" prompts with vowels (reward: the fraction of vowels), under a KL
penalty to its starting point. The same run is made twice, with ``kl_estimator="k3"`` (TRL's
own estimator: TikeGRPOTrainer reproduces GRPOTrainer's loss there, tests/test_trl.py) and
with ``"tike"``; on every micro-batch the exact KL(pi_theta || pi_ref) of the same tokens is
computed from the same logits and logged as ``kl_exact`` beside the estimate (``kl``) the
loss used. The figure shows both estimates against the exact KL.

    pip install '.[trl]'      # trl, transformers, datasets, ... (matplotlib for the figure)
    python examples/trl_grpo.py --steps 60 --out trl_grpo_kl.png
"""
import argparse
import os
import tempfile
import time

from tike_cuda.integrations.tiny_lm import OFFLINE_ENV

os.environ.update(OFFLINE_ENV)  # nothing is downloaded

import torch  # noqa: E402
from transformers import AutoTokenizer, PrinterCallback  # noqa: E402

import tike_cuda  # noqa: E402
from tike_cuda.integrations.tiny_lm import prompt_dataset, save_tiny_lm, vowel_reward  # noqa: E402
from tike_cuda.integrations.trl import TikeGRPOConfig, TikeGRPOTrainer  # noqa: E402


class ExactKLLogged(TikeGRPOTrainer):
    """Logs ``kl_exact``, the exact token-mean KL on the micro-batch the loss's ``kl`` saw."""

    def kl_term(self, policy_lm, hidden, ref, inputs, mask):
        out = super().kl_term(policy_lm, hidden, ref, inputs, mask)
        with torch.no_grad():
            exact = tike_cuda.full_kl(self.output_logits(policy_lm, hidden),
                                      self.output_logits(*ref), temperature=self.temperature,
                                      mask=mask.bool())
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl_exact"].append(self._global_masked_mean(exact, mask))
        return out


def run(estimator, model_path, tokenizer, a, out_dir):
    args = TikeGRPOConfig(
        output_dir=out_dir, kl_estimator=estimator, kl_topk=a.kl_topk, beta=a.beta,
        learning_rate=a.lr, max_steps=a.steps, per_device_train_batch_size=a.batch,
        num_generations=a.group, max_completion_length=a.length, temperature=1.0,
        num_iterations=a.iterations, bf16=False, use_cpu=True, gradient_checkpointing=False,
        report_to=[], logging_steps=1, save_strategy="no", seed=a.seed, disable_dropout=True,
        disable_tqdm=True)
    trainer = ExactKLLogged(model=model_path, reward_funcs=vowel_reward, args=args,
                            processing_class=tokenizer,
                            train_dataset=prompt_dataset(a.steps * a.batch, seed=a.seed))
    trainer.remove_callback(PrinterCallback)  # the summary below instead of every log dict
    trainer.train()
    rows = [h for h in trainer.state.log_history if "kl" in h]
    return {key: [r.get(key, float("nan")) for r in rows]
            for key in ("step", "kl", "kl_exact", "reward")}


def plot(curves, a, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.8), sharey=True)
    for ax, (name, c) in zip(axes, curves.items()):
        label = f"{name} (k={a.kl_topk})" if name.startswith("tike") else name
        ax.plot(c["step"], c["kl_exact"], color="black", lw=2, label="exact KL, same batch")
        ax.plot(c["step"], c["kl"], color="tab:red" if name == "k3" else "tab:blue", lw=1.2,
                marker="o", ms=2.5, label=f"{label} estimate (in the loss)")
        err = torch.tensor(c["kl"]) - torch.tensor(c["kl_exact"])
        ax.set_title(f"kl_estimator={name!r}: estimate − exact = {err.mean():+.3f} "
                     f"± {err.std():.3f}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    top = max(max(c["kl"] + c["kl_exact"]) for c in curves.values())
    axes[0].set_ylim(bottom=min(0.0, axes[0].get_ylim()[0]), top=1.3 * top)  # room for legends
    axes[0].set_ylabel("token-mean KL(π_θ ‖ π_ref), nats")
    fig.suptitle(f"TikeGRPOTrainer (TRL {_trl_version()}), tiny Qwen2 on the CPU, "
                 f"beta={a.beta}, {a.batch} completions per step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _trl_version():
    import trl
    return trl.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--estimators", default="k3,tike", help="comma-separated, run in order")
    ap.add_argument("--kl-topk", type=int, default=8, help="TIKE's k (the vocabulary has 45)")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16, help="completions per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--length", type=int, default=12, help="max completion tokens")
    ap.add_argument("--iterations", type=int, default=1, help="num_iterations (mu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model: 1)")
    ap.add_argument("--out", default="trl_grpo_kl.png", help="figure ('' for none)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = save_tiny_lm(os.path.join(tmp, "tiny_lm"), initializer_range=0.4)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        curves = {}
        for name in a.estimators.split(","):
            t0 = time.perf_counter()
            c = curves[name] = run(name, model_path, tokenizer, a, os.path.join(tmp, name))
            err = torch.tensor(c["kl"]) - torch.tensor(c["kl_exact"])
            print(f"{name:12s} {time.perf_counter() - t0:5.1f} s | final exact KL "
                  f"{c['kl_exact'][-1]:.4f}, estimate {c['kl'][-1]:.4f} | estimate - exact over "
                  f"{len(err)} steps: mean {err.mean():+.4f}, std {err.std():.4f} | reward "
                  f"{c['reward'][0]:.3f} -> {c['reward'][-1]:.3f}")
    if a.out:
        plot(curves, a, a.out)
        print(f"figure: {a.out}")


if __name__ == "__main__":
    main()
