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
from tike_cuda.estimators import ESTIMATORS, SAMPLED_ESTIMATORS  # noqa: E402

__all__ = ["TikeGRPOConfig", "TikeGRPOTrainer", "SUPPORTED_TRL", "TESTED_TRL"]


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
    """

    kl_estimator: str = field(
        default="tike",
        metadata={"help": "Per-token KL estimator: " + ", ".join(ESTIMATORS) + "."})
    kl_topk: int = field(
        default=16, metadata={"help": "k of the 'tike' and 'tike_bucket' estimators."})
    fused_lm_head: bool = field(
        default=False, metadata={"help": "KL term from hidden states in chunks of rows, without "
                                         "[B, T, V] logits (tike_cuda.fused_linear)."})

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
      backward; with ``fused_lm_head`` one more again, recomputed) and one for the reference; the reference's forward runs per micro-batch and
      per iteration (``num_iterations`` times per generation batch) instead of once per
      generation batch, and TRL's own reference pass at generation time is skipped.

    Not supported with ``beta > 0`` (a clear error at construction): vision-language
    models, an adapter on the output layer, FSDP and DeepSpeed ZeRO-3.

    Where variants slot in: :meth:`_reference_hidden` says where the reference comes from
    (its result is handed to :meth:`kl_term` untouched, so a sparse reference stored at
    generation time can replace it), and :meth:`kl_term` gets the policy's hidden states,
    not logits (so a fused output-layer loss can replace the ``[B, T, V]`` projection).
    """

    def __init__(self, model, reward_funcs=None, args: TikeGRPOConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = TikeGRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-GRPO")
        if not isinstance(args, TikeGRPOConfig):
            raise TypeError(f"args must be a TikeGRPOConfig, got {type(args).__name__}")
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
        with self._trl_kl_off():
            return super()._generate_and_score_completions(inputs)

    def _compute_loss(self, model, inputs):
        if self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        # The reference first: no graph is alive yet, and only its hidden states are kept.
        ref = self._reference_hidden(inputs)
        policy_lm = self._causal_lm(model)
        n_policy_loss = len(self._metrics[mode].get("policy_loss", ()))  # no empty key
        with self._trl_kl_off(), _last_hidden_states(policy_lm) as captured:
            loss = super()._compute_loss(model, inputs)
        hidden = _completion_positions(_one_forward(captured, mask.size(0)), mask.size(1))

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
        (with gradient); ``ref``: what :meth:`_reference_hidden` returned. The one place the
        KL term is formed (a sparse reference stored at generation time, or a fused
        output layer that never materialises logits, replace this method).
        """
        if self.args.fused_lm_head:
            return self._fused_kl_term(policy_lm, hidden, ref, inputs, mask)
        tokens = inputs["completion_ids"]
        estimator, tau = self.args.kl_estimator, self.temperature
        with torch.no_grad():
            ref_logits = self.output_logits(*ref)
        logits = self.output_logits(policy_lm, hidden)
        topk_mass = None
        if estimator in SAMPLED_ESTIMATORS:
            logp = tike_cuda.token_logprobs(logits, tokens, temperature=tau)
            ref_logp = tike_cuda.token_logprobs(ref_logits, tokens, temperature=tau)
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
                    logits, ref_logits, min(self.args.kl_topk, logits.size(-1)),
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
        layers (its backward recomputes each chunk's policy logits)."""
        ref_lm, ref_hidden = ref
        head, ref_head = policy_lm.get_output_embeddings(), ref_lm.get_output_embeddings()
        scale, _ = _logit_scale_and_softcap(policy_lm.config)
        frozen = lambda t: None if t is None else t.detach().float()
        estimator = self.args.kl_estimator
        with torch.autocast(hidden.device.type, enabled=False):
            out = tike_cuda.fused_linear.fused_linear_logprobs_kl(
                hidden.float(), head.weight.float(), inputs["completion_ids"], mask,
                ref_hidden.float(), frozen(ref_head.weight),
                bias=None if head.bias is None else head.bias.float(),
                ref_bias=frozen(ref_head.bias), kl_estimator=estimator,
                k=min(self.args.kl_topk, head.weight.size(0)),
                temperature=self.temperature / scale)  # softmax(scale · z / τ)
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

    @torch.no_grad()
    def _reference_hidden(self, inputs):
        """The reference causal LM (whose output layer maps the states to logits) and its last
        hidden states at the completion positions ``[B, T, H]``."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        n = inputs["completion_ids"].size(1)
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


def _one_forward(captured, batch):
    if not captured or sum(h.size(0) for h in captured) != batch:
        raise RuntimeError(
            f"TikeGRPOTrainer expected trl's _compute_loss to run the policy's body on the "
            f"{batch} sequences of the micro-batch (got {[tuple(h.shape) for h in captured]}); "
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
