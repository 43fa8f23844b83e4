"""TikeGRPOTrainer against TRL's own GRPOTrainer: real trainers, a tiny Qwen2 built in code,
the CPU, float32, nothing downloaded.

The policy starts away from its reference (tiny_lm.perturb_, KL ~ 0.7 nats per token) and
beta = 1, so the KL term and the loss stay far from zero and a relative tolerance means
something; the optimizer is plain SGD, because Adam's first step is lr * sign(g) per weight
and would turn a rounding-level gradient difference in a near-zero entry into a full step.
"""
import copy
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tike_cuda.integrations.tiny_lm import OFFLINE_ENV

os.environ.update(OFFLINE_ENV)  # before the Hugging Face libraries read it at import

if os.environ.get("CI") is None:  # in CI the [trl] extra is installed: a missing trl fails there
    pytest.importorskip("trl", reason="needs the [trl] extra: pip install '.[trl]'")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import tike_cuda.integrations.trl as tike_trl  # noqa: E402
from tike_cuda.integrations.tiny_lm import (perturb_, prompt_dataset, save_tiny_lm,  # noqa: E402
                                             vowel_reward)
from tike_cuda.integrations.trl import TikeGRPOConfig, TikeGRPOTrainer  # noqa: E402

RTOL = 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
    return path, AutoTokenizer.from_pretrained(path)


def _args(config_cls, tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, max_steps=2, beta=1.0, num_iterations=2,
                learning_rate=0.02, optim="sgd", bf16=False, use_cpu=True, report_to=[],
                logging_steps=1, save_strategy="no", seed=0, disable_dropout=True,
                gradient_checkpointing=False)
    return config_cls(**{**base, **overrides})


def _trainer(trainer_cls, args, tiny, **kwargs):
    path, tokenizer = tiny
    model = perturb_(AutoModelForCausalLM.from_pretrained(path))
    torch.manual_seed(0)  # a PEFT adapter's initialisation, the same for both trainers
    return trainer_cls(model=model, reward_funcs=vowel_reward, args=args,
                       train_dataset=prompt_dataset(16), processing_class=tokenizer, **kwargs)


def _train(trainer_cls, args, tiny, **kwargs):
    trainer = _trainer(trainer_cls, args, tiny, **kwargs)
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def _assert_same_steps(ours, theirs, keys=("loss", "kl"), rtol=RTOL):
    """The first logged step (before any update) within `rtol`; later ones within 10 rtol:
    the two trainers' gradients agree to float32 rounding, not bit for bit (tike_cuda's
    log-probs and TRL's selective log-softmax round differently), and an update at lr 0.05
    carries that into the next step's parameters."""
    assert len(ours) == len(theirs) > 0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        tol = rtol if step == 0 else 10 * rtol
        for key in keys:
            assert abs(a[key] - b[key]) <= tol * abs(b[key]), (step, key, a[key], b[key])


# -- 1. "k3" is TRL's own KL term ------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_k3_reproduces_trl_step_by_step(tiny, tmp_path, loss_type):
    # num_iterations = 2: steps 1 and 3 generate, step 2 reuses step 1's batch off-policy,
    # with TRL's old log-probs in the importance weight of the KL.
    common = dict(loss_type=loss_type, max_steps=3)
    _, theirs = _train(GRPOTrainer, _args(GRPOConfig, tmp_path, **common), tiny)
    _, ours = _train(TikeGRPOTrainer,
                     _args(TikeGRPOConfig, tmp_path, kl_estimator="k3", **common), tiny)
    _assert_same_steps(ours, theirs)
    assert len(ours) == 3 and all(row["kl"] > 0.1 for row in ours)


@pytest.mark.parametrize("overrides", [
    dict(loss_type="bnpo"), dict(loss_type="dr_grpo"), dict(loss_type="cispo"),
    dict(loss_type="sapo"), dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="vespo"), dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", use_bias_correction_kl=False),
    dict(loss_type="bnpo", gradient_accumulation_steps=2, temperature=0.7),
    dict(loss_type="dr_grpo", entropy_coef=0.01),  # TRL then logs policy_loss, KL included
], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_k3_reproduces_trl_every_reduction(tiny, tmp_path, overrides):
    _, theirs = _train(GRPOTrainer, _args(GRPOConfig, tmp_path, **overrides), tiny)
    _, ours = _train(TikeGRPOTrainer,
                     _args(TikeGRPOConfig, tmp_path, kl_estimator="k3", **overrides), tiny)
    _assert_same_steps(ours, theirs, keys=("kl", "policy_loss") if "entropy_coef" in overrides
                       else ("kl",))
    # VESPO's loss is -phi * A * log p: terms of a few nats that cancel to a fraction of one,
    # so the rounding of log p (not of the KL) shows at 1e-6 of the sum after a step.
    _assert_same_steps(ours, theirs, keys=("loss",),
                       rtol=1e-5 if overrides["loss_type"] == "vespo" else RTOL)


# -- 2. the dense estimators train; the reference stays frozen -------------------------------

@pytest.mark.parametrize("estimator", ["tike", "tike_bucket", "full"])
def test_dense_estimators_train(tiny, tmp_path, estimator):
    path, _ = tiny
    reference = AutoModelForCausalLM.from_pretrained(path).state_dict()
    start = perturb_(AutoModelForCausalLM.from_pretrained(path)).state_dict()
    # TRL's defaults here: gradient checkpointing on
    args = _args(TikeGRPOConfig, tmp_path, kl_estimator=estimator, kl_topk=8,
                 gradient_checkpointing=True)
    trainer, rows = _train(TikeGRPOTrainer, args, tiny)

    assert len(rows) == 2
    for row in rows:
        assert torch.isfinite(torch.tensor([row["loss"], row["kl"]])).all()
        assert row["kl"] > 0.1
        if estimator != "full":
            assert 0.3 < row["kl_topk_mass"] < 1.0
    policy = trainer.model.state_dict()
    moved = [k for k in start if not torch.equal(policy[k], start[k])]
    assert "lm_head.weight" in moved and len(moved) > len(start) // 2
    for name, value in trainer.ref_model.state_dict().items():
        assert torch.equal(value, reference[name]), name


# -- 3. top-k over the whole vocabulary is the exact KL --------------------------------------

def test_tike_with_k_at_least_vocab_is_full(tiny, tmp_path):
    vocab = len(tiny[1])
    _, full = _train(TikeGRPOTrainer, _args(TikeGRPOConfig, tmp_path, kl_estimator="full"), tiny)
    for k in (vocab, vocab + 19):
        _, tike = _train(TikeGRPOTrainer,
                         _args(TikeGRPOConfig, tmp_path, kl_estimator="tike", kl_topk=k), tiny)
        _assert_same_steps(tike, full)
        assert all(abs(row["kl_topk_mass"] - 1.0) < 1e-6 for row in tike)


# -- PEFT: the reference is the policy with its adapter disabled -----------------------------

def test_peft_reference_k3_reproduces_trl(tiny, tmp_path):
    peft = pytest.importorskip("peft")

    def lora():  # B random, not zero: the policy differs from its reference from the start
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                               init_lora_weights=False, task_type="CAUSAL_LM")

    common = dict(max_steps=3, learning_rate=0.05)
    trl_trainer, theirs = _train(GRPOTrainer, _args(GRPOConfig, tmp_path, **common), tiny,
                                 peft_config=lora())
    trainer, ours = _train(TikeGRPOTrainer,
                           _args(TikeGRPOConfig, tmp_path, kl_estimator="k3", **common), tiny,
                           peft_config=lora())
    assert trainer.ref_model is None and trl_trainer.ref_model is None
    _assert_same_steps(ours, theirs)
    assert all(row["kl"] > 0.01 for row in ours)


def test_peft_reference_tike_trains_the_adapter_only(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")
    # gradient checkpointing on (TRL's default): switched off around the reference's forward
    args = _args(TikeGRPOConfig, tmp_path, kl_estimator="tike", gradient_checkpointing=True)
    trainer = _trainer(TikeGRPOTrainer, args, tiny, peft_config=lora)
    start = {k: v.clone() for k, v in trainer.model.get_base_model().state_dict().items()}
    trainer.train()
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 2
    assert all(row["kl"] > 0.01 and 0 < row["kl_topk_mass"] < 1 for row in rows)
    state = trainer.model.get_base_model().state_dict()
    adapters = [k for k in state if "lora_" in k]
    assert adapters and all(not torch.equal(state[k], start[k]) for k in adapters)
    for name in state:
        if "lora_" not in name:  # the base model is the reference: it never moves
            assert torch.equal(state[name], start[name]), name


# -- pieces: float32 logits under autocast, configuration, version check, lazy import -------

def test_output_logits_are_float32_outside_autocast(tiny):
    lm = AutoModelForCausalLM.from_pretrained(tiny[0]).to(torch.bfloat16)
    hidden = torch.randn(2, 3, lm.config.hidden_size, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = TikeGRPOTrainer.output_logits(lm, hidden)
    assert logits.dtype == torch.float32
    expected = hidden.float() @ lm.lm_head.weight.float().T
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="kl_estimator"):
        _args(TikeGRPOConfig, tmp_path, kl_estimator="k4")
    for k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="kl_topk"):
            _args(TikeGRPOConfig, tmp_path, kl_topk=k)
    assert _args(TikeGRPOConfig, tmp_path).kl_estimator == "tike"
    assert _args(TikeGRPOConfig, tmp_path).kl_topk == 16


def test_trainer_needs_its_config(tiny, tmp_path):
    path, tokenizer = tiny
    with pytest.raises(TypeError, match="TikeGRPOConfig"):
        TikeGRPOTrainer(model=path, reward_funcs=vowel_reward, args=_args(GRPOConfig, tmp_path),
                        train_dataset=prompt_dataset(4), processing_class=tokenizer)


def test_unsupported_trl_version_names_the_supported_ones(monkeypatch):
    monkeypatch.setattr(tike_trl.metadata, "version", lambda name: "1.15.0")
    with pytest.raises(ImportError, match=r"found trl 1\.15\.0.*1\.16\.x"):
        tike_trl._check_trl()

    def missing(name):
        raise tike_trl.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(tike_trl.metadata, "version", missing)
    with pytest.raises(ImportError, match=r"trl is not installed.*1\.16\.x.*\[trl\]"):
        tike_trl._check_trl()


def test_readme_with_trl_snippet_builds_the_trainer(tiny, tmp_path):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("### With TRL"):], re.S).group(1)
    code = code.replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(tiny[0]))
    code = code.replace('output_dir="out"', f"output_dir={str(tmp_path)!r}, use_cpu=True")
    code = code.replace("trainer.train()", "")  # TRL's defaults: minutes of the CPU
    env = {"reward_fn": vowel_reward, "dataset": prompt_dataset(8)}
    exec(compile(code, "README.md", "exec"), env)
    trainer = env["trainer"]
    assert isinstance(trainer, TikeGRPOTrainer) and trainer.beta == 0.04
    assert (trainer.args.kl_estimator, trainer.args.kl_topk) == ("tike", 16)


def test_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    example = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo.py"
    figure = tmp_path / "kl.png"
    monkeypatch.setattr(sys, "argv", [str(example), "--steps", "2", "--batch", "4", "--group",
                                      "4", "--length", "4", "--out", str(figure)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(example), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the example sets it for a tiny model
    assert figure.stat().st_size > 10_000


def test_import_tike_cuda_does_not_import_trl():
    code = ("import sys, tike_cuda, tike_cuda.integrations; "
            "heavy = {'trl', 'transformers', 'datasets', 'accelerate'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


# -- fused_lm_head: the same KL term without [B, T, V] logits ---------------------------------

@pytest.mark.parametrize("overrides", [
    dict(kl_estimator="tike", kl_topk=8), dict(kl_estimator="tike_bucket", loss_type="grpo"),
    dict(kl_estimator="full", temperature=0.7), dict(kl_estimator="k3", loss_type="bnpo"),
], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_fused_lm_head_matches_the_logits_path(tiny, tmp_path, overrides):
    _, plain = _train(TikeGRPOTrainer, _args(TikeGRPOConfig, tmp_path, **overrides), tiny)
    _, fused = _train(TikeGRPOTrainer,
                      _args(TikeGRPOConfig, tmp_path, fused_lm_head=True, **overrides), tiny)
    keys = ("loss", "kl") + (("kl_topk_mass",) if overrides["kl_estimator"] != "full"
                             and overrides["kl_estimator"] != "k3" else ())
    # two SGD steps on the same batches: the second step sees the first one's update
    _assert_same_steps(fused, plain, keys=keys)
    assert all(row["kl"] > 0.1 for row in fused)


def test_fused_lm_head_config(tmp_path):
    assert _args(TikeGRPOConfig, tmp_path).fused_lm_head is False
    with pytest.raises(ValueError, match="fused_lm_head"):
        _args(TikeGRPOConfig, tmp_path, fused_lm_head="yes")


@pytest.mark.parametrize("kl_reference", ["dense", "sparse"])
def test_fused_lm_head_with_peft_reproduces_trl(tiny, tmp_path, kl_reference):
    # the reference's output layer is the policy's own (adapter disabled): read, detached;
    # or, with kl_reference="sparse", the reference stored at generation time (step 1 is
    # the batch's second iteration: log q(o) from the store, no reference forward)
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                               init_lora_weights=False, task_type="CAUSAL_LM")

    common = dict(max_steps=2, learning_rate=0.05)
    _, theirs = _train(GRPOTrainer, _args(GRPOConfig, tmp_path, **common), tiny,
                       peft_config=lora())
    _, ours = _train(TikeGRPOTrainer, _args(TikeGRPOConfig, tmp_path, kl_estimator="k3",
                                            fused_lm_head=True, kl_reference=kl_reference,
                                            **common), tiny, peft_config=lora())
    _assert_same_steps(ours, theirs)


def test_fused_lm_head_refuses_a_soft_cap(tiny, tmp_path):
    path, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="soft cap"):
        TikeGRPOTrainer(model=model, reward_funcs=vowel_reward,
                        args=_args(TikeGRPOConfig, tmp_path, fused_lm_head=True),
                        train_dataset=prompt_dataset(4), processing_class=tokenizer)


# -- kl_reference="sparse": the reference stored on S~ once per generation batch -------------

class _Recording(TikeGRPOTrainer):
    """Records, per loss: the micro-batch, the policy's float32 logits at the completion
    positions before the loss's forward, TRL's loss without a KL term (TRL's own
    _compute_loss with beta = 0), the per-token KL term, the loss; per generation whether
    the old policy's top-k came from TRL's own old-log-prob forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records, self.support_from_trl = [], []

    def _compute_loss(self, model, inputs):
        n = inputs["completion_ids"].size(1)
        with torch.no_grad():
            logits = model(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                           attention_mask=torch.cat([inputs["prompt_mask"],
                                                     inputs["completion_mask"]], 1)).logits
        record = dict(step=self._step, inputs=inputs, logits=logits[:, -n - 1:-1].float())
        metrics = copy.deepcopy(self._metrics)  # TRL logs what it computes: not this one
        with torch.no_grad(), self._trl_kl_off():
            record["policy_term"] = GRPOTrainer._compute_loss(self, model, inputs)
        self._metrics = metrics
        self.records.append(record)
        loss = super()._compute_loss(model, inputs)
        record["loss"] = loss.detach()
        return loss

    def kl_term(self, *args):
        kl, mass = super().kl_term(*args)
        self.records[-1]["kl"] = kl.detach()
        return kl, mass

    def _sparse_reference_store(self, batch, support):
        self.support_from_trl.append(support is not None)
        return super()._sparse_reference_store(batch, support)


@pytest.mark.parametrize("overrides", [
    dict(kl_estimator="tike"),
    dict(kl_estimator="tike_bucket", loss_type="grpo", temperature=0.7, fused_lm_head=True),
], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_sparse_reference_first_iteration_is_dense(tiny, tmp_path, overrides):
    # num_iterations = 1: every batch is used once, by the policy that sampled it, so S~ is
    # the current policy's top-k and the stored reference gives dense TIKE's loss and KL.
    # TRL computes no old log-probs here: the policy's body runs once more for its top-k.
    common = dict(num_iterations=1, kl_topk=8, **overrides)
    dense_args = {k: v for k, v in common.items() if k != "fused_lm_head"}
    _, dense = _train(TikeGRPOTrainer, _args(TikeGRPOConfig, tmp_path, **dense_args), tiny)
    trainer, sparse = _train(_Recording, _args(TikeGRPOConfig, tmp_path, kl_reference="sparse",
                                               **common), tiny)
    _assert_same_steps(sparse, dense, keys=("loss", "kl", "kl_topk_mass"))
    assert trainer.support_from_trl == [False, False]
    assert all(row["kl"] > 0.1 for row in sparse)
    for record in trainer.records:  # the store travelled with the batch, 8 + 1 ids a token
        assert record["inputs"]["ref_sparse_idx"].shape == record["inputs"]["completion_ids"].shape + (9,)


@pytest.mark.parametrize("fused_lm_head", [False, True])
def test_sparse_reference_later_iterations(tiny, tmp_path, fused_lm_head):
    # num_iterations = 2: steps 0 and 2 generate, step 1 reuses step 0's batch with a policy
    # that has moved. The reference model's body runs at generation only, and step 1's KL is
    # TIKE on the fixed S~ = (top-8 of the policy that sampled) ∪ {o}, as the float64
    # reference computes it, with TRL's old log-probs in the importance weight.
    from tike_cuda.reference import topk_indices, topk_kl_reference
    k, tail = 8, "bucket"
    args = _args(TikeGRPOConfig, tmp_path, kl_reference="sparse", kl_estimator="tike_bucket",
                 kl_topk=k, max_steps=3, loss_type="bnpo", fused_lm_head=fused_lm_head)
    trainer = _trainer(_Recording, args, tiny)
    ref_calls = []
    hook = trainer.ref_model.base_model.register_forward_hook(
        lambda *_: ref_calls.append(trainer._step))
    trainer.train()
    hook.remove()
    rows = [h for h in trainer.state.log_history if "loss" in h]

    assert sorted(set(ref_calls)) == [0, 2]  # never at step 1
    assert trainer.support_from_trl == [True, True]  # TRL's old-policy forward gave the top-k
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor([r["loss"], r["kl"]])).all()
                                  for r in rows)
    first, second = trainer.records[:2]
    inputs, mask = second["inputs"], second["inputs"]["completion_mask"].bool()
    assert first["inputs"] is inputs and second["step"] == 1
    tokens = inputs["completion_ids"]
    support = topk_indices(first["logits"], k)  # the old policy's, at generation
    stored = inputs["ref_sparse_idx"][..., :k]
    assert torch.equal(stored[mask].long(), support[mask])
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], tokens], 1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        ref_logits = trainer.ref_model(input_ids=ids, attention_mask=attention).logits
    ref_logits = ref_logits[:, -tokens.size(1) - 1:-1]
    expected = topk_kl_reference(second["logits"], ref_logits, k, sampled_tokens=tokens,
                                 old_logprobs=inputs["old_per_token_logps"], mask=mask,
                                 support=support, tail=tail)
    torch.testing.assert_close(second["kl"].double(), expected, rtol=1e-5, atol=1e-6)
    kl_mean = (expected * mask).sum() / mask.sum()
    assert abs(rows[1]["kl"] - kl_mean.item()) <= 1e-5 * kl_mean.item()
    # the loss: TRL's policy term + beta (= 1) * the KL's bnpo mean
    loss = second["policy_term"].double() + kl_mean
    torch.testing.assert_close(second["loss"].double(), loss, rtol=1e-5, atol=1e-6)
    assert kl_mean > 0.1 and abs(second["policy_term"]) < kl_mean
    dense = topk_kl_reference(second["logits"], ref_logits, k, sampled_tokens=tokens,
                              old_logprobs=inputs["old_per_token_logps"], mask=mask, tail=tail)
    dense_mean = (dense * mask).sum() / mask.sum()
    # the policy moved: S~ of step 1 is not its current top-k, and that shows in the KL
    assert (topk_indices(second["logits"], k) != support)[mask].any()
    assert abs(dense_mean - kl_mean) > 1e-3 * kl_mean


def test_sparse_reference_k3_reproduces_trl(tiny, tmp_path):
    # TRL, too, runs its reference once per generation batch and keeps log q(o): k3 on the
    # stored log q(o) is TRL's own KL term, step by step, across iterations
    common = dict(max_steps=3)
    _, theirs = _train(GRPOTrainer, _args(GRPOConfig, tmp_path, **common), tiny)
    _, ours = _train(TikeGRPOTrainer, _args(TikeGRPOConfig, tmp_path, kl_estimator="k3",
                                            kl_reference="sparse", **common), tiny)
    _assert_same_steps(ours, theirs)


def test_sparse_reference_config(tmp_path):
    assert _args(TikeGRPOConfig, tmp_path).kl_reference == "dense"
    with pytest.raises(ValueError, match="kl_reference must be one of"):
        _args(TikeGRPOConfig, tmp_path, kl_reference="stored")
    # "full" needs the reference's whole distribution: refused when it is stored on S~ only
    with pytest.raises(ValueError, match="kl_estimator='full'.*kl_reference='sparse'"):
        _args(TikeGRPOConfig, tmp_path, kl_estimator="full", kl_reference="sparse")
    for estimator in ("tike", "tike_bucket", "k1", "abs", "k2", "k3", "low_var_kl"):
        for fused in (False, True):
            _args(TikeGRPOConfig, tmp_path, kl_estimator=estimator, kl_reference="sparse",
                  fused_lm_head=fused)
