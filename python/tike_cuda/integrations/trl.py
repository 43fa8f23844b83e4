r"""Hugging Face TRL's ``GRPOTrainer`` with its KL term computed by tike_cuda from logits.

    from tike_cuda.integrations.trl import TikeGRPOConfig, TikeGRPOTrainer

    args = TikeGRPOConfig(output_dir="out", beta=0.04, kl_estimator="tike", kl_topk=16)
    trainer = TikeGRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=reward,
                              args=args, train_dataset=dataset)
    trainer.train()

TRL 1.16 penalises with k3 of the sampled token's two log-probs only. ``TikeGRPOTrainer``
replaces that term, when ``beta > 0``, by any estimator :func:`tike_cuda.per_token_kl`
knows ("k1", "abs", "k2", "k3", "low_var_kl", "full", "tike", "tike_bucket"), computed with
tike_cuda's fused ops from float32 logits of the policy (with gradient) and of the
reference (without) for the same micro-batch. Everything else is TRL's own code path.

Supported: trl 1.16.x (tested with 1.16.0; ``pip install 'tike_cuda[trl]'`` installs the
tested versions). Importing this module with trl missing, or of another version, raises an
ImportError that says so; ``import tike_cuda`` alone never imports trl.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata

SUPPORTED_TRL = ((1, 16),)  # (major, minor) release series this adapter is written against
TESTED_TRL = "1.16.0"


def _check_trl() -> None:
    """An ImportError naming the supported trl versions, before anything of trl is imported."""
    wanted = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_TRL)
    hint = f"tike_cuda.integrations.trl supports trl {wanted} (tested with {TESTED_TRL}): " \
           f"pip install 'tike_cuda[trl]'"
    try:
        found = metadata.version("trl")
    except metadata.PackageNotFoundError:
        raise ImportError(f"trl is not installed; {hint}") from None
    from packaging.version import InvalidVersion, Version
    try:
        series = Version(found).release[:2]
    except InvalidVersion:
        series = None
    if series not in SUPPORTED_TRL:
        raise ImportError(f"found trl {found}; {hint}")


_check_trl()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

import tike_cuda  # noqa: E402
from tike_cuda import SparseReference  # noqa: E402
from tike_cuda.estimators import ESTIMATORS, SAMPLED_ESTIMATORS  # noqa: E402
from tike_cuda.fused_linear import chunk_rows  # noqa: E402

__all__ = ["TikeGRPOConfig", "TikeGRPOTrainer", "SUPPORTED_TRL", "TESTED_TRL", "KL_REFERENCES",
           "SPARSE_REFERENCE_KEYS"]

KL_REFERENCES = ("dense", "sparse")
# The batch keys of the sparse reference's fields (SparseReference.idx, .logprobs,
# .tail_logmass): plain [B, T(, K1)] tensors, so TRL shuffles and splits them with the batch.
SPARSE_REFERENCE_KEYS = ("ref_sparse_idx", "ref_sparse_logprobs", "ref_sparse_tail_logmass")


@dataclass
class TikeGRPOConfig(GRPOConfig):
    r"""``trl.GRPOConfig`` plus the KL estimator of :class:`TikeGRPOTrainer`.

    Args:
        kl_estimator (`str`, defaults to ``"tike"``): the per-token KL(π_θ ‖ π_ref) estimate
            added as ``beta * kl``; one of ``tike_cuda.estimators.ESTIMATORS``. ``"k3"`` is
            the estimator TRL itself uses.
        kl_topk (`int`, defaults to 16): k of ``"tike"`` / ``"tike_bucket"`` (the policy's
            k most likely tokens, united with the sampled one). Values above the vocabulary
            size mean the whole vocabulary.
        fused_lm_head (`bool`, defaults to False): form the KL term from the output layers'
            hidden states in chunks of rows (``tike_cuda.fused_linear``), never holding a
            ``[B, T, V]`` logits tensor, as TRL's own path does for its log-probs.
        kl_reference (`str`, defaults to ``"dense"``): how the reference reaches the KL term.
            ``"dense"``: the reference model runs at update time, per micro-batch and per
            iteration, and its logits are read whole. ``"sparse"``: it runs once per
            generation batch, where TRL computes its reference log-probs, and only a
            :class:`tike_cuda.SparseReference` is kept — ``log q`` on S~ = the old policy's
            top-``kl_topk`` ∪ {sampled token}, and the tail mass: N·K1·8 + N·4 bytes for the
            N completion positions (K1 = k + 1; 140 bytes a token at k = 16). "tike" and
            "tike_bucket" are then TIKE on that fixed S~ (the same as "dense" on a batch's
            first iteration, where the old policy is the current one); the sampled-token
            estimators read ``log q(o)`` from it; "full" needs the whole reference
            distribution and is refused.
    """

    kl_estimator: str = field(
        default="tike",
        metadata={"help": "Per-token KL estimator: " + ", ".join(ESTIMATORS) + "."})
    kl_topk: int = field(
        default=16, metadata={"help": "k of the 'tike' and 'tike_bucket' estimators."})
    fused_lm_head: bool = field(
        default=False, metadata={"help": "KL term from hidden states in chunks of rows, without "
                                         "[B, T, V] logits (tike_cuda.fused_linear)."})
    kl_reference: str = field(
        default="dense", metadata={"help": "'dense': the reference's logits at update time; "
                                           "'sparse': a SparseReference stored once per "
                                           "generation batch."})

    def __post_init__(self):
        super().__post_init__()
        if self.kl_estimator not in ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {list(ESTIMATORS)}, "
                             f"got {self.kl_estimator!r}")
        if isinstance(self.kl_topk, bool) or not isinstance(self.kl_topk, int) \
                or self.kl_topk < 1:
            raise ValueError(f"kl_topk must be an int >= 1, got {self.kl_topk!r}")
        if not isinstance(self.fused_lm_head, bool):
            raise ValueError(f"fused_lm_head must be a bool, got {self.fused_lm_head!r}")
        if self.kl_reference not in KL_REFERENCES:
            raise ValueError(f"kl_reference must be one of {list(KL_REFERENCES)}, "
                             f"got {self.kl_reference!r}")
        if self.kl_reference == "sparse" and self.kl_estimator == "full":
            raise ValueError("kl_estimator='full' needs the reference's whole distribution at "
                             "update time; kl_reference='sparse' stores it on S~ only. Use "
                             "'tike' or 'tike_bucket' (or a sampled-token estimator), or "
                             "kl_reference='dense'")


class TikeGRPOTrainer(GRPOTrainer):
    r"""``trl.GRPOTrainer`` whose KL term is ``args.kl_estimator``, computed from logits.

    With ``beta == 0`` this is TRL's trainer unchanged. With ``beta > 0``, per micro-batch:

    * TRL's policy term is TRL's own (its fused log-prob path, clipping, every mask).
    * The KL term, added where TRL adds ``beta * per_token_kl`` (after every mask of the
      policy term; reduced by the same ``loss_type`` rule, which is linear in it)::

          kl[b, t] = w[b, t] * D_est(p_bt, q_bt)
          p = softmax(z / τ), q = softmax(z_ref / τ)    (τ = args.temperature)

      ``z``: float32 logits of the policy's output layer run outside autocast on the last
      hidden states of TRL's own forward of this micro-batch (so the gradient flows into
      the same graph); ``z_ref``: the same for the reference, without gradient. The
      reference is ``self.ref_model`` or, for a PEFT policy, the policy with its adapter
      disabled (or TRL's "ref" adapter when it made one).
    * ``w`` is the importance weight TRL's ``use_bias_correction_kl`` applies (1 when that
      is off): ``coef = exp(log π_θ(o) − log π_old(o))`` per token, or TRL's sequence-level
      geometric mean of it for ``importance_sampling_level="sequence"``; ``log π_old`` is
      TRL's ``old_per_token_logps`` (``num_iterations > 1``, misaligned accumulation, vLLM)
      and ``log π_θ`` itself otherwise. For the sampled-token estimators ``w = coef`` with
      its gradient, as TRL does; for "full", "tike" and "tike_bucket" ``w = sg(coef)``: the
      TIKE paper's detached ratio r (its Eq. 13, 17).
    * Logged: ``kl`` (TRL's metric name: masked token mean of ``kl`` over all processes)
      and, for "tike"/"tike_bucket", ``kl_topk_mass`` (mean Σ_{S~} p_v).

    Cost against TRL's path (which never materialises logits: its fused head projects
    tiles and keeps per-token log-probs):

    * memory: per micro-batch, one ``[B, T, V]`` float32 logits tensor per model (4·B·T·V
      bytes: 2.5 GB at B = 1, T = 4096, V = 151,936, so keep ``per_device_train_batch_size``
      small). The policy's lives from the KL's forward to its backward; "tike" and
      "tike_bucket" then write their gradient over it, "full" and the sampled-token
      estimators allocate the gradient beside it. The reference's is freed after the
      KL's forward ("full" keeps it for its backward).
      With ``fused_lm_head=True`` neither is ever whole: chunks of rows of both (at most
      ``tike_cuda.fused_linear.DEFAULT_MEMORY_BUDGET`` bytes together), the policy's
      recomputed in the backward.
    * compute: one more output-layer projection per micro-batch for the policy (forward and
      backward; with ``fused_lm_head`` one more again, recomputed) and one for the
      reference; the reference's forward runs per micro-batch and per iteration
      (``num_iterations`` times per generation batch) instead of once per generation
      batch, and TRL's own reference pass at generation time is skipped.

    With ``kl_reference="sparse"`` the reference runs once per generation batch instead:

    * at generation time (:meth:`_generate_and_score_completions`, where TRL computes its
      ``ref_per_token_logps``): the old policy's top-k ids ``S`` =
      ``tike_cuda.topk_indices`` of its float32 logits at the completion positions, then
      the reference's body and ``tike_cuda.sparse_reference(ref_logits, S, sampled_tokens=o,
      temperature=τ, mask)``. Both projections run over chunks of rows
      (``tike_cuda.fused_linear.DEFAULT_MEMORY_BUDGET`` bytes of logits at a time). The old
      policy's logits come from the last hidden states of TRL's own old-log-prob forward
      when TRL runs one: whenever the policy may move before the batch's last use
      (``gradient_accumulation_steps`` not a multiple of ``steps_per_generation ×
      num_iterations``, e.g. ``num_iterations > 1`` with the defaults), and with vLLM's
      importance-sampling correction. Where TRL runs none (e.g. ``num_iterations == 1``:
      TRL then takes the old log-probs from the update's own forward) the policy's body
      runs once more per generation batch, without gradient — the one extra forward of
      this mode, about a third of a training forward and backward.
    * the store's fields travel in the batch (:data:`SPARSE_REFERENCE_KEYS`), shuffled and
      split into micro-batches with it, and live until the next generation.
    * at update time, per micro-batch and iteration: no reference forward and no reference
      logits; "tike"/"tike_bucket" are ``tike_cuda.topk_kl(logits, store, ...)`` (with
      ``fused_lm_head``: ``fused_linear_logprobs_kl(..., sparse_ref=store)``), TIKE with
      the current policy's p on the stored S~ and the same weight ``w``; the sampled-token
      estimators use the stored ``log q(o)``. ``kl_topk_mass`` is Σ_{S~} p_v on that S~.

    Against "dense" this saves, per micro-batch, the reference's float32 ``[B, T, V]``
    logits at update time (4·B·T·V bytes; with ``fused_lm_head`` its chunks and its
    projection) and the reference's forward on every iteration after a batch's first
    (``num_iterations`` reference forwards per sample become one). It costs the store,
    N·K1·8 + N·4 bytes per generation batch of N completion positions (K1 = ``kl_topk``
    + 1: 140 bytes a token at k = 16; 2.3 MB at N = 16,384), an output-layer projection of
    the old policy for its top-k, and the policy forward above where TRL runs none.
    Until the policy moves after generation (a batch's first iteration, with the default
    ``steps_per_generation``) it equals "dense": S~ is the current policy's top-k. After,
    S~ stays the old policy's: TIKE on a fixed support, bounded and smooth in the logits
    (docs/sparse_reference.md).

    Not supported with ``beta > 0`` (a clear error at construction): vision-language
    models, an adapter on the output layer, FSDP and DeepSpeed ZeRO-3.

    Where variants slot in: :meth:`_reference` says where the reference comes from (the
    reference model's hidden states, or the stored :class:`tike_cuda.SparseReference`;
    its result is handed to :meth:`kl_term` untouched), and :meth:`kl_term` gets the
    policy's hidden states, not logits (so a fused output-layer loss can replace the
    ``[B, T, V]`` projection).
    """

    def __init__(self, model, reward_funcs=None, args: TikeGRPOConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = TikeGRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-GRPO")
        if not isinstance(args, TikeGRPOConfig):
            raise TypeError(f"args must be a TikeGRPOConfig, got {type(args).__name__}")
        self._old_support = None  # while generating with kl_reference="sparse": π_old's top-k
        super().__init__(model, reward_funcs, args, **kwargs)
        if self.beta != 0.0:
            self._check_supported()

    def _check_supported(self) -> None:
        if self._is_vlm:
            raise NotImplementedError("TikeGRPOTrainer supports text-only models (the "
                                      "reference is run on input_ids alone)")
        if self.is_fsdp_enabled or (self.is_deepspeed_enabled and self.accelerator.state
                                    .deepspeed_plugin.zero_stage == 3):
            raise NotImplementedError("TikeGRPOTrainer does not support FSDP or DeepSpeed "
                                      "ZeRO-3 yet (the output layer is read directly)")
        for lm in (self._causal_lm(self.model),
                   None if self.ref_model is None else self._causal_lm(self.ref_model)):
            if lm is not None and not isinstance(lm.get_output_embeddings(), torch.nn.Linear):
                raise ValueError("the model's output layer must be a torch.nn.Linear; an "
                                 "adapter on lm_head is not supported")
            if lm is None or not self.args.fused_lm_head:
                continue
            scale, softcap = _logit_scale_and_softcap(lm.config)
            if softcap is not None or scale <= 0:
                raise NotImplementedError("fused_lm_head=True needs logits that are the output "
                                          "layer's times a positive scale (no soft cap)")

    # -- TRL's code paths, with TRL's own k3 switched off ------------------------------------

    @contextmanager
    def _trl_kl_off(self):
        """TRL forms its k3 (and computes reference log-probs for it) wherever
        ``self.beta != 0``: switched off while TRL's code runs; the KL is added here."""
        beta, self.beta = self.beta, 0.0
        try:
            yield
        finally:
            self.beta = beta

    def _generate_and_score_completions(self, inputs):
        if self.beta == 0.0:
            return super()._generate_and_score_completions(inputs)
        if self.args.kl_reference == "dense":
            with self._trl_kl_off():
                return super()._generate_and_score_completions(inputs)
        self._old_support = []  # filled by TRL's old-policy forward, if it runs one
        try:
            with self._trl_kl_off():
                batch = super()._generate_and_score_completions(inputs)
            support = torch.cat(self._old_support) if self._old_support else None
        finally:
            self._old_support = None
        store = self._sparse_reference_store(batch, support)
        batch.update(zip(SPARSE_REFERENCE_KEYS, (store.idx, store.logprobs, store.tail_logmass)))
        return batch

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask,
                                           logits_to_keep, *args, **kwargs):
        """TRL's; while a sparse reference is being built, the old policy's top-k ids are
        taken from the same forward (its body's last hidden states)."""
        if self._old_support is None or model is not self.model:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        lm = self._causal_lm(model)
        with _last_hidden_states(lm) as captured:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        hidden = _one_forward(captured, input_ids.size(0), "_get_per_token_logps_and_entropies")
        self._old_support.append(self._old_topk(
            lm, _completion_positions(hidden, logits_to_keep),
            attention_mask[:, -logits_to_keep:]))
        return out

    def _compute_loss(self, model, inputs):
        if self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        # The reference first: no graph is alive yet, and only its hidden states are kept.
        ref = self._reference(inputs)
        policy_lm = self._causal_lm(model)
        n_policy_loss = len(self._metrics[mode].get("policy_loss", ()))  # no empty key
        with self._trl_kl_off(), _last_hidden_states(policy_lm) as captured:
            loss = super()._compute_loss(model, inputs)
        hidden = _completion_positions(_one_forward(captured, mask.size(0), "_compute_loss"),
                                       mask.size(1))

        per_token_kl, topk_mass = self.kl_term(policy_lm, hidden, ref, inputs, mask)
        kl_loss, kl_in_policy_loss = self._reduce_like_trl(self.beta * per_token_kl, mask,
                                                           inputs, mode)
        metrics = self._metrics[mode]
        metrics["kl"].append(self._global_masked_mean(per_token_kl, mask))
        if topk_mass is not None:
            metrics["kl_topk_mass"].append(self._global_masked_mean(topk_mass, mask))
        if len(metrics.get("policy_loss", ())) > n_policy_loss:  # TRL's includes its KL term
            metrics["policy_loss"][-1] += \
                self.accelerator.gather(kl_in_policy_loss.detach()).nanmean().item()
        return loss + kl_loss

    # -- the KL term ------------------------------------------------------------------------

    def kl_term(self, policy_lm, hidden, ref, inputs, mask):
        """Per-token KL ``[B, T]`` (zero where ``mask`` is 0) and the top-k mass (or None).

        ``hidden``: the policy's last hidden states at the completion positions ``[B, T, H]``
        (with gradient); ``ref``: what :meth:`_reference` returned — the reference's causal
        LM and hidden states, or the stored SparseReference (``topk_kl`` takes it in place
        of the reference logits). The one place the KL term is formed.
        """
        if self.args.fused_lm_head:
            return self._fused_kl_term(policy_lm, hidden, ref, inputs, mask)
        tokens = inputs["completion_ids"]
        estimator, tau = self.args.kl_estimator, self.temperature
        stored = isinstance(ref, SparseReference)
        if stored:  # topk_kl takes it where the reference logits go; S~ (and k) are its own
            ref_logits, k = ref, ref.k
        else:
            with torch.no_grad():
                ref_logits = self.output_logits(*ref)
            k = min(self.args.kl_topk, ref_logits.size(-1))
        logits = self.output_logits(policy_lm, hidden)
        topk_mass = None
        if estimator in SAMPLED_ESTIMATORS:
            logp = tike_cuda.token_logprobs(logits, tokens, temperature=tau)
            ref_logp = ref.token_logprobs(tokens) if stored else \
                tike_cuda.token_logprobs(ref_logits, tokens, temperature=tau)
            del ref_logits
            kl = tike_cuda.kl_penalty(logp, ref_logp, estimator)
            weight = self._kl_weight(logp, inputs, mask)  # differentiable, as TRL's
        else:
            weight = None
            if self.args.use_bias_correction_kl and "old_per_token_logps" in inputs:
                with torch.no_grad():  # the paper's r is a constant for autograd
                    weight = self._kl_weight(
                        tike_cuda.token_logprobs(logits.detach(), tokens, temperature=tau),
                        inputs, mask)
            if estimator == "full":
                kl = tike_cuda.full_kl(logits, ref_logits, temperature=tau, mask=mask.bool())
            else:
                # Nothing else reads these logits (the output layer's backward needs only its
                # input and weight): the gradient may overwrite them.
                kl, stats = tike_cuda.topk_kl(
                    logits, ref_logits, k,
                    sampled_tokens=tokens, temperature=tau, mask=mask.bool(),
                    tail="bucket" if estimator == "tike_bucket" else "none",
                    return_stats=True, inplace_backward=True)
                topk_mass = stats.topk_mass
        if weight is not None:
            kl = kl * weight
        return torch.where(mask.bool(), kl, torch.zeros_like(kl)), topk_mass

    def _fused_kl_term(self, policy_lm, hidden, ref, inputs, mask):
        """:meth:`kl_term` with ``args.fused_lm_head``: the same float32 computation by
        ``tike_cuda.fused_linear.fused_linear_logprobs_kl``, over chunks of rows of the output
        layers (its backward recomputes each chunk's policy logits); a stored SparseReference
        stands in for the reference's output layer (``sparse_ref=``)."""
        head = policy_lm.get_output_embeddings()
        scale, _ = _logit_scale_and_softcap(policy_lm.config)
        if isinstance(ref, SparseReference):  # built at τ on the scaled logits: consistent
            reference, k = dict(sparse_ref=ref), ref.k
        else:
            (ref_lm, ref_hidden), frozen = ref, lambda t: None if t is None else t.detach().float()
            ref_head = ref_lm.get_output_embeddings()
            reference = dict(ref_hidden=ref_hidden.float(), ref_weight=frozen(ref_head.weight),
                             ref_bias=frozen(ref_head.bias))
            k = min(self.args.kl_topk, head.weight.size(0))
        estimator = self.args.kl_estimator
        with torch.autocast(hidden.device.type, enabled=False):
            out = tike_cuda.fused_linear.fused_linear_logprobs_kl(
                hidden.float(), head.weight.float(), inputs["completion_ids"], mask,
                bias=None if head.bias is None else head.bias.float(), kl_estimator=estimator,
                k=k, temperature=self.temperature / scale, **reference)  # softmax(scale · z / τ)
        if estimator in SAMPLED_ESTIMATORS:
            weight = self._kl_weight(out.logprobs, inputs, mask)  # differentiable, as TRL's
        elif self.args.use_bias_correction_kl and "old_per_token_logps" in inputs:
            weight = self._kl_weight(out.logprobs.detach(), inputs, mask)  # the paper's sg(r)
        else:
            weight = None
        kl = out.kl if weight is None else out.kl * weight
        return torch.where(mask.bool(), kl, torch.zeros_like(kl)), out.topk_mass

    def _kl_weight(self, logp, inputs, mask):
        """TRL's ``coef_1`` (the importance ratio its ``use_bias_correction_kl`` applies to the
        KL) from ``logp``, the policy's log-probs of the completion tokens; None when off."""
        if not self.args.use_bias_correction_kl:
            return None
        old = inputs.get("old_per_token_logps")
        log_ratio = logp - (logp.detach() if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)

    def _reference(self, inputs):
        """What :meth:`kl_term` gets as the reference of this micro-batch: the stored
        SparseReference (``kl_reference="sparse"``), else :meth:`_reference_hidden`."""
        if self.args.kl_reference == "sparse":
            idx, logprobs, tail = (inputs[key] for key in SPARSE_REFERENCE_KEYS)
            return SparseReference(idx, logprobs, tail, idx.size(-1) - 1)  # S~ = S ∪ {o}
        return self._reference_hidden(inputs)

    @torch.no_grad()
    def _reference_hidden(self, inputs):
        """The reference causal LM (whose output layer maps the states to logits) and its last
        hidden states at the completion positions ``[B, T, H]``."""
        input_ids, attention_mask, n = _sequences(inputs)
        if self.ref_model is not None:
            lm = self._causal_lm(self.ref_model)
            return lm, _completion_positions(self._backbone(lm, input_ids, attention_mask), n)
        # PEFT: the policy with its adapter disabled, or TRL's copy of the initial adapter.
        peft_model = self.accelerator.unwrap_model(self.model)
        adapter = "ref" if "ref" in peft_model.peft_config else None
        with use_adapter(peft_model, adapter_name=adapter), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs):
            lm = peft_model.get_base_model()
            return lm, _completion_positions(self._backbone(lm, input_ids, attention_mask), n)

    # -- kl_reference="sparse": the store, built at generation time ---------------------------

    @torch.no_grad()
    def _sparse_reference_store(self, batch, support):
        """The reference on S~ = π_old's top-k ∪ {o} for every completion of the generation
        batch, one micro-batch of sequences at a time. ``support``: π_old's top-k ids
        ``[B, T, k]`` from TRL's old-policy forward, or None (then the policy's body runs
        here, once)."""
        mask, size = batch["completion_mask"].bool(), self._forward_batch_size()
        policy_lm = self._causal_lm(self.model)
        parts = []
        for s in range(0, mask.size(0), size):
            rows = {key: batch[key][s:s + size] for key in
                    ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
            if support is None:
                input_ids, attention_mask, n = _sequences(rows)
                with disable_gradient_checkpointing(self.model,
                                                    self.args.gradient_checkpointing_kwargs):
                    hidden = self._backbone(policy_lm, input_ids, attention_mask)
                rows_support = self._old_topk(policy_lm, _completion_positions(hidden, n),
                                              mask[s:s + size])
                del hidden
            else:
                rows_support = support[s:s + size]
            ref_lm, ref_hidden = self._reference_hidden(rows)
            parts.append(self._over_row_chunks(
                ref_lm, ref_hidden,
                lambda ref_logits, sup, tok, m: tike_cuda.sparse_reference(
                    ref_logits, sup, sampled_tokens=tok, temperature=self.temperature, mask=m),
                rows_support, rows["completion_ids"], mask[s:s + size]))
        return SparseReference.cat(parts)

    def _old_topk(self, lm, hidden, mask):
        """π_old's top-``kl_topk`` ids ``[B, T, k]`` (−1 where ``mask`` is 0) from its states
        at the completion positions; the order of the logits is τ's and the scale's alike."""
        k = min(self.args.kl_topk, lm.get_output_embeddings().weight.size(0))
        return self._over_row_chunks(lm, hidden, lambda logits, m: tike_cuda.topk_indices(
            logits, k, mask=m), mask.bool())

    @torch.no_grad()
    def _over_row_chunks(self, lm, hidden, fn, *per_token):
        """``fn(logits, *rows of per_token)`` over chunks of rows of ``hidden`` ``[B, T, H]``,
        with float32 :meth:`output_logits` of at most ``DEFAULT_MEMORY_BUDGET`` bytes a chunk
        (the no-gradient passes never hold a micro-batch's ``[B, T, V]``); the chunks'
        results (tensors or SparseReferences) joined back to ``[B, T, ...]``."""
        B, T, H = hidden.shape
        rows = hidden.reshape(B * T, H)
        flat = [x.reshape(B * T, *x.shape[2:]) for x in per_token]
        step = chunk_rows(lm.get_output_embeddings().weight.size(0), torch.float32, None)
        parts = [fn(self.output_logits(lm, rows[s:s + step]), *(x[s:s + step] for x in flat))
                 for s in range(0, B * T, step)]
        if isinstance(parts[0], SparseReference):
            return SparseReference.cat(parts).reshape(B, T)
        return torch.cat(parts).reshape(B, T, *parts[0].shape[1:])

    def _forward_batch_size(self):
        """Sequences per forward at generation time, as TRL's scoring forwards."""
        return self.args.per_device_train_batch_size if self.model.training \
            else self.args.per_device_eval_batch_size

    def _backbone(self, lm, input_ids, attention_mask):
        # As TRL's fused head: the body under the trainer's autocast, no cache.
        with self.accelerator.autocast():
            out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                use_cache=False)
        return out.last_hidden_state

    @staticmethod
    def output_logits(lm, hidden):
        """float32 logits of ``lm``'s output layer on ``hidden``, run outside autocast (a
        bfloat16 projection moves the KL by percents), scaled as the model's forward does."""
        head = lm.get_output_embeddings()
        bias = None if head.bias is None else head.bias.float()
        with torch.autocast(hidden.device.type, enabled=False):
            logits = F.linear(hidden.float(), head.weight.float(), bias)
        scale, softcap = _logit_scale_and_softcap(lm.config)
        if scale != 1.0:
            logits = logits * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return logits

    def _causal_lm(self, model):
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    # -- TRL's reductions, for a term TRL would have added to its per-token loss -----------

    def _reduce_like_trl(self, per_token, mask, inputs, mode):
        """TRL 1.16's ``loss_type`` reduction of a per-token term ``[B, T]``, as it reduces
        its ``per_token_loss``: (its share of the returned loss, of the ``policy_loss``
        metric)."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        x = per_token * mask
        if self.loss_type in ("grpo", "sapo"):
            agg = (x.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type == "bnpo":
            agg = x.sum() / mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            agg = x.sum() / (x.size(0) * self.max_completion_length)
        elif self.loss_type == "luspo":
            agg = x.sum(-1).mean()
        elif self.loss_type in ("cispo", "dapo", "vespo"):
            # normalised by the batch's token count, not by the accumulation steps
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            agg = x.sum() / normalizer
            return agg, agg
        else:
            raise ValueError(f"unknown loss_type {self.loss_type!r}")
        return agg / accumulation, agg

    def _global_masked_mean(self, x, mask) -> float:
        """Masked mean over every process's tokens (TRL's reduction of its ``kl`` metric)."""
        local = torch.stack([(x.detach() * mask).sum(), mask.sum().float()])
        total = self.accelerator.reduce(local, reduction="sum")
        return (total[0] / total[1].clamp(min=1.0)).item()


@contextmanager
def _last_hidden_states(lm):
    """Collects the last hidden states of every forward of ``lm``'s body (TRL's fused head
    runs the body, then projects them; they are where the KL's logits come from)."""
    captured = []
    handle = lm.base_model.register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        yield captured
    finally:
        handle.remove()


def _sequences(inputs):
    """(prompt + completion ids, their attention mask, the completion length)."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    return input_ids, attention_mask, inputs["completion_ids"].size(1)


def _one_forward(captured, batch, where):
    if not captured or sum(h.size(0) for h in captured) != batch:
        raise RuntimeError(
            f"TikeGRPOTrainer expected trl's {where} to run the policy's body on the "
            f"{batch} sequences it was given (got {[tuple(h.shape) for h in captured]}); "
            f"this trl version is not supported (tested with {TESTED_TRL})")
    return captured[0] if len(captured) == 1 else torch.cat(captured, dim=0)


def _completion_positions(hidden, n):
    """The states that predict the ``n`` completion tokens: positions ``L-n-1 .. L-2``."""
    return hidden[:, -n - 1:-1]


def _logit_scale_and_softcap(config):
    """The multiplier and soft cap the model's forward applies to its logits (the config
    names TRL 1.16's fused head reads)."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)
