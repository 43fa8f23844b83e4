"""tike_cuda's verl plugin in verl's real ActorRolloutRefWorker: an actor and a reference
(FSDP2 engines, gloo, one rank, on the CPU) on a tiny Qwen2, with the passes the v1
trainer runs — old policy, reference, update — and its bookkeeping between them.

The stored top-k ids, reference log-probs and tail are checked against a plain Hugging Face
forward; the KL in the actor's loss against tike_cuda's op on the same logits; verl's own
k3 loss against the adapter's, metric for metric.
"""
from functools import partial

import pytest

import _verl_helpers as H

H.use_cpu_platform()
H.single_rank_env()

import torch  # noqa: E402

import tike_cuda  # noqa: E402
from tike_cuda.integrations import verl as tike_verl  # noqa: E402
from verl.trainer.ppo.core_algos import agg_loss  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.metric import reduce_metrics  # noqa: E402
from verl.utils.py_functional import rename_dict  # noqa: E402
from verl.workers.engine_workers import ActorRolloutRefWorker  # noqa: E402
from verl.workers.utils.losses import ppo_loss as verl_ppo_loss  # noqa: E402
from verl.workers.utils.padding import response_from_nested  # noqa: E402

pytestmark = pytest.mark.timeout(240, method="thread")

K = 4  # support size: actor.kl_loss_type=tike:4 (tests/_verl_helpers.compose)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("verl_models")
    actor = H.make_tiny_qwen2(root / "actor", seed=0)
    ref = H.make_tiny_qwen2(root / "ref", seed=1, like=actor, noise=0.05)
    return actor, ref


def make_worker(model_path, role, *overrides):
    worker = ActorRolloutRefWorker(H.compose(model_path, *overrides).actor_rollout_ref, role=role)
    worker.init_model()
    return worker


# verl's layouts of a micro-batch: packed without padding, padded [B, T], and packed with
# micro-batches formed by token count (samples reordered, outputs restored to batch order)
LAYOUTS = {
    "remove_padding": ["actor_rollout_ref.model.use_remove_padding=true"],
    "padded": ["actor_rollout_ref.model.use_remove_padding=false"],
    "dynamic_bsz": ["actor_rollout_ref.model.use_remove_padding=true",
                    *(f"actor_rollout_ref.{key}=true" for key in (
                        "actor.use_dynamic_bsz", "rollout.log_prob_use_dynamic_bsz",
                        "ref.log_prob_use_dynamic_bsz")),
                    *(f"actor_rollout_ref.{key}=20" for key in (
                        "actor.ppo_max_token_len_per_gpu", "rollout.log_prob_max_token_len_per_gpu",
                        "ref.log_prob_max_token_len_per_gpu"))],
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    return LAYOUTS[request.param]


@pytest.fixture(scope="module")
def workers(layout, checkpoints):
    return make_worker(checkpoints[0], "actor", *layout), make_worker(checkpoints[1], "ref", *layout)


def forward_pass(method, td, log_prob_key, calculate_entropy):
    """A forward-only pass of the v1 trainer (_compute_old_log_prob / _compute_ref_log_prob):
    the worker's outputs become fields of ``td``, as its TransferQueue put would make them."""
    data = td.clone()
    tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=calculate_entropy,
                         compute_loss=False)
    out = method(data)
    td[log_prob_key] = response_from_nested(out["log_probs"], td["response_mask"])
    for key in out.keys():
        if key.startswith("tike_"):
            td[key] = out[key]
    return out


def old_pass(actor, td):
    return forward_pass(actor.compute_log_prob, td, "old_log_probs", calculate_entropy=True)


def ref_pass(ref, td):
    return forward_pass(ref.compute_ref_log_prob, td, "ref_log_prob", calculate_entropy=False)


def update(actor, td, advantages):
    """The v1 trainer's _update_actor: one mini-batch (the whole batch) of 2 micro-batches."""
    data = td.clone()
    data["advantages"] = advantages
    B = data.batch_size[0]
    tu.assign_non_tensor(data, calculate_entropy=False, distillation_use_topk=False,
                         distillation_only=False, global_batch_size=B, mini_batch_size=B,
                         epochs=1, seed=1, dataloader_kwargs={"shuffle": False}, temperature=1.0)
    return reduce_metrics(rename_dict(actor.update_actor(data)["metrics"], "actor/"))


def nested_like(values_per_sample):
    return torch.nested.as_nested_tensor(values_per_sample, layout=torch.jagged)


@pytest.fixture(scope="module")
def passes(workers):
    actor, ref = workers
    samples = H.make_samples(seed=3)
    td = H.to_tensordict(samples)
    old_out = old_pass(actor, td)
    ref_out = ref_pass(ref, td)
    return samples, td, old_out, ref_out


@pytest.fixture(scope="module")
def hf(checkpoints, passes):
    samples = passes[0]
    return H.hf_logits(checkpoints[0], samples), H.hf_logits(checkpoints[1], samples)


def test_plugin_is_active_in_the_worker(workers):
    actor, ref = workers
    assert tike_verl.installed()
    assert actor.actor.loss_fn.func is tike_verl.ppo_loss  # engine_workers.ppo_loss, replaced
    assert actor.actor._tike.role == "actor" and ref.ref._tike.role == "ref"
    assert actor.actor._tike.choice == tike_verl.KlChoice(estimator="tike", k=K)


def test_verl_log_probs_match_hugging_face(passes, hf):
    samples, td, old_out, ref_out = passes
    for out, logits in ((old_out, hf[0]), (ref_out, hf[1])):
        for b, s in enumerate(samples):
            rows, tokens = H.response_rows(logits[b], s)
            expected = torch.log_softmax(rows, -1).gather(-1, tokens[:, None])[:, 0]
            got = response_from_nested(out["log_probs"], td["response_mask"])[b]
            torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)


def test_old_pass_stores_the_policys_topk(passes, hf):
    samples, td, _, _ = passes
    assert td["tike_support"].dtype == torch.int32
    for b, s in enumerate(samples):
        support = td["tike_support"][b]
        rows, _ = H.response_rows(hf[0][b], s)
        mask = s["response_mask"].bool()
        assert support.shape == (len(s["responses"]), K)
        assert (support[~mask] == -1).all()  # not trained on: not computed
        top = torch.topk(rows, K + 1, dim=-1)
        for t in mask.nonzero()[:, 0].tolist():
            # the k largest logits, best first (ids exact where no near-tie blurs them)
            torch.testing.assert_close(rows[t][support[t].long()], top.values[t, :K],
                                       atol=1e-4, rtol=0)
            if (top.values[t, :K].diff().abs().min() > 1e-3
                    and top.values[t, K - 1] - top.values[t, K] > 1e-3):
                assert support[t].tolist() == top.indices[t, :K].tolist()


def test_ref_pass_stores_the_sparse_reference(passes, hf):
    samples, td, _, _ = passes
    K1 = K + 1
    for b, s in enumerate(samples):
        idx, logq, tail = (td[key][b] for key in tike_verl.REF_KEYS)
        rows, tokens = H.response_rows(hf[1][b], s)
        mask = s["response_mask"].bool()
        assert idx.shape == logq.shape == (len(tokens), K1) and tail.shape == (len(tokens),)
        assert idx.dtype == torch.int32 and logq.dtype == tail.dtype == torch.float32
        logq_hf = torch.log_softmax(rows, -1)
        for t in mask.nonzero()[:, 0].tolist():
            support = td["tike_support"][b][t]
            assert idx[t, :K].tolist() == support.tolist()
            o = int(tokens[t])
            assert idx[t, K] == (-1 if o in support.tolist() else o)  # S~ = support ∪ {o}
            members = idx[t][idx[t] >= 0].long()
            torch.testing.assert_close(logq[t][idx[t] >= 0].double(), logq_hf[t, members],
                                       atol=2e-5, rtol=0)
            outside = torch.ones(H.VOCAB, dtype=torch.bool)
            outside[members] = False
            torch.testing.assert_close(tail[t].double(), torch.logsumexp(logq_hf[t, outside], 0),
                                       atol=2e-5, rtol=2e-5)
        assert (idx[~mask] == -1).all() and (tail[~mask] == 0).all()


def expected_kl(samples, td, actor_logits, tail):
    """tike_cuda's op on the same logits: the sparse reference as stored, TIKE per token,
    verl's token-mean over the batch's response tokens."""
    per_token, masks = [], []
    for b, s in enumerate(samples):
        rows, tokens = H.response_rows(actor_logits[b], s)
        mask = s["response_mask"].bool()
        ref = tike_cuda.SparseReference(*(td[key][b] for key in tike_verl.REF_KEYS), K)
        per_token.append(tike_cuda.topk_kl(rows.float(), ref, K, sampled_tokens=tokens,
                                           old_logprobs=td["old_log_probs"][b], mask=mask,
                                           tail=tail))
        masks.append(mask)
    kl = torch.nn.utils.rnn.pad_sequence(per_token, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence(masks, batch_first=True)
    return agg_loss(kl, mask, "token-mean").item()


@pytest.mark.parametrize("estimator", ["tike", "tike_bucket"])
def test_kl_in_the_loss_is_tike_of_the_policy_logits(workers, layout, checkpoints, passes, hf,
                                                     estimator):
    actor, _ = workers
    if estimator != "tike":  # the same policy, configured for the other estimator
        actor = make_worker(checkpoints[0], "actor", *layout,
                            f"actor_rollout_ref.actor.kl_loss_type={estimator}:{K}")
    samples, td, _, _ = passes
    metrics = update(actor, td, nested_like([torch.zeros(len(s["responses"])) for s in samples]))
    expected = expected_kl(samples, td, hf[0], "bucket" if estimator == "tike_bucket" else "none")
    assert expected > 1e-3  # the reference differs from the policy
    assert metrics["actor/kl_loss"] == pytest.approx(expected, rel=2e-5)
    # lr = 0: advantages 0, so the loss is the KL term alone
    assert metrics["actor/loss"] == pytest.approx(0.5 * expected, rel=2e-5)


def test_k3_through_the_adapter_is_verls_own_k3(checkpoints, passes):
    samples, td, _, _ = passes
    actor = make_worker(checkpoints[0], "actor", "actor_rollout_ref.actor.kl_loss_type=k3")
    assert actor.actor.loss_fn.func is tike_verl.ppo_loss and not hasattr(actor.actor, "_tike")
    g = torch.Generator().manual_seed(5)
    data = td.clone()
    # log-ratios up to 45: verl's k3 is low_var_kl, clamped; tike_cuda's "k3" is not
    ratio = [torch.randn(len(s["responses"]), generator=g) * 3 for s in samples]
    ratio[0][0] = 45.0
    data["ref_log_prob"] = nested_like([lp + r for lp, r in zip(td["old_log_probs"].unbind(), ratio)])
    adv = nested_like([torch.randn(len(s["responses"]), generator=g) for s in samples])

    adapter = update(actor, data, adv)
    config = actor.actor.loss_fn.keywords["config"]
    actor.actor.set_loss_fn(partial(verl_ppo_loss, config=config))
    verl = update(actor, data, adv)  # lr = 0: the same weights, the same batch
    for key in ("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/kl_coef", "actor/grad_norm"):
        assert adapter[key] == verl[key], key  # bit for bit
    unclamped = tike_cuda.kl_penalty(torch.zeros(1), torch.tensor([45.0]), "k3").item()
    assert unclamped > 1e17 and adapter["actor/kl_loss"] < 10


def test_refused_at_start(checkpoints):
    for override, reason in [("actor_rollout_ref.model.use_fused_kernels=true", "fused kernels"),
                             ("actor_rollout_ref.actor.pad_to_length=true", "static pad"),
                             ("actor_rollout_ref.actor.use_kl_loss=false", "use_kl_loss")]:
        worker = ActorRolloutRefWorker(H.compose(checkpoints[0], override).actor_rollout_ref,
                                       role="actor")
        with pytest.raises(ValueError, match=reason):
            worker.init_model()
        assert worker.actor is None  # refused before anything was built


def test_verls_cross_entropy_backward_leaves_the_logits_to_tike(workers, passes, monkeypatch):
    """On a GPU verl's flash-attn cross-entropy may write its gradient over the logits in its
    backward, which TIKE's backward reads afterwards: in the update the plugin asks verl's
    log-prob function for its out-of-place backward (what reaches it, recorded here)."""
    from verl.utils import torch_functional
    actor, _ = workers
    samples, td, _, _ = passes
    calls = []
    verl_fn = torch_functional.logprobs_from_logits

    def recording(*args, **kwargs):
        calls.append(kwargs.get("inplace_backward", True))
        return verl_fn(*args, **kwargs)

    monkeypatch.setattr(torch_functional, "logprobs_from_logits", recording)
    update(actor, td, nested_like([torch.zeros(len(s["responses"])) for s in samples]))
    assert calls and not any(calls)
