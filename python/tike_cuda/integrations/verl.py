r"""TIKE as the KL loss of verl's PPO/GRPO actor, through the sparse reference.

Switched on by configuration alone (the ``[verl]`` extra registers this module as a verl
plugin, loaded at ``import verl`` in every process)::

    actor_rollout_ref.actor.use_kl_loss=true
    actor_rollout_ref.actor.kl_loss_type=tike          # or tike_bucket; tike:32 for k = 32

verl 0.9 never has dense reference logits at the actor's update: the reference runs as its
own pass. So S~ is fixed before the update (paper Eq. 17 treats it as a constant anyway),
by the old policy, and the reference is stored on it (docs/verl.md):

1. old-policy pass (``_compute_old_log_prob``, actor engine, no grad):
   ``topk_indices(logits, k)`` on the response positions → ``tike_support`` ``[k]`` int32;
2. reference pass (``_compute_ref_log_prob``, reference engine):
   ``sparse_reference(ref_logits, tike_support, sampled_tokens=o)`` → ``tike_ref_idx``
   ``[k+1]`` int32, ``tike_ref_logprobs`` ``[k+1]`` float32, ``tike_ref_tail_logmass`` float32;
3. update (``_update_actor``): ``topk_kl(logits, that SparseReference, sampled_tokens=o,
   old_logprobs=old_log_probs)`` per token, and the actor loss gains
   ``kl_loss_coef · agg(TIKE)`` with ``loss_agg_mode``'s own aggregation (``actor/kl_loss``).

Each store is a per-response-token field of verl's TransferQueue, which keeps every key a
worker returns: 4k + 8(k+1) + 4 bytes per response token (204 at k = 16).

Where verl hands out the logits: ``FSDPEngineWithLMHead.prepare_model_outputs`` calls a
logits processor (``logits_processor_func``) with the logits already divided by the
temperature, when the micro-batch says ``distillation_use_topk``; this adapter raises that
flag for its own passes only. The actor loss is ``engine_workers.ppo_loss`` (a module
global that ``init_model`` binds), replaced by :func:`ppo_loss`: verl's own policy loss,
plus the KL term assembled here — for verl's sampled-token names (``low_var_kl``/``k3``,
``kl``/``k1``, ``abs``, ``mse``/``k2``, and their ``+`` forms) with verl's own
``kl_penalty``, so their meaning (verl's ``k3`` is the clamped ``low_var_kl``) is verl's.

Refused at start, with the reason: verl's Megatron engine (vocabulary split across ranks),
fused kernels and ``pad_to_length`` (no logits handed out / a static pad), Ulysses sequence
parallelism, distillation, ``rollout_correction.bypass_mode`` and trainers that replace the
old-policy or reference pass (no top-k ids / no sparse reference), the legacy
``use_v1=false`` trainer (keeps only ``log_probs`` between passes), ``use_kl_loss=false``.

Supported: verl 0.9.x (tested with 0.9.1, FSDP/FSDP2 engine, v1 trainer).
"""
from __future__ import annotations

import copy
import functools
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from ._import_hooks import when_imported
from ._verl_passes import (DEFAULT_K, K_KEY, KL_KEY, REF_KEYS, STAGE_KEY, STORED_KEYS,  # noqa: F401
                           SUPPORT_KEY, TAIL_KEY, logprobs_from_logits,
                           wrap_prepare_model_outputs)

__all__ = ["KlChoice", "parse_kl_loss_type", "check_config", "ppo_loss", "installed",
           "SUPPORTED_VERL", "TESTED_VERL", "DEFAULT_K", "STORED_KEYS"]

SUPPORTED_VERL = ((0, 9),)  # (major, minor) release series this adapter is written against
TESTED_VERL = "0.9.1"

_log = logging.getLogger(__name__)

_TIKE_RE = re.compile(r"^(tike|tike_bucket)(?::(\d+))?$")


@dataclass(frozen=True)
class KlChoice:
    """What ``actor.kl_loss_type`` asks for: TIKE (``estimator`` "tike"/"tike_bucket",
    support size ``k``) or one of verl's own sampled-token penalties (``verl_kind``)."""
    estimator: Optional[str] = None
    k: int = DEFAULT_K
    verl_kind: Optional[str] = None

    @property
    def tike(self) -> bool:
        return self.estimator is not None

    @property
    def tail(self) -> str:
        return "bucket" if self.estimator == "tike_bucket" else "none"


def parse_kl_loss_type(value) -> KlChoice:
    """``tike`` / ``tike_bucket`` with an optional ``:k`` (``tike:32``); a name starting with
    "tike" otherwise is a ValueError naming ``actor.kl_loss_type``. Any other name is verl's
    (``low_var_kl``/``k3``, ``kl``/``k1``, ``abs``, ``mse``/``k2``, with or without ``+``):
    passed to verl's ``kl_penalty`` as it is, which judges it as verl does."""
    if not isinstance(value, str):
        raise TypeError(f"actor.kl_loss_type must be a string, got {type(value).__name__}")
    if not value.startswith("tike"):
        return KlChoice(verl_kind=value)
    m = _TIKE_RE.match(value)
    if not m or (m.group(2) and int(m.group(2)) < 1):
        raise ValueError(f"actor.kl_loss_type={value!r}: expected tike or tike_bucket, "
                         "optionally with ':k' (k >= 1, e.g. tike:32)")
    return KlChoice(estimator=m.group(1), k=int(m.group(2)) if m.group(2) else DEFAULT_K)


def _get(cfg, path: str, default=None):
    """``cfg.a.b.c`` for a DictConfig or a dataclass config, ``default`` where absent."""
    for part in path.split("."):
        if cfg is None:
            return default
        cfg = cfg.get(part, None) if hasattr(cfg, "get") else getattr(cfg, part, None)
    return default if cfg is None else cfg


def check_config(actor_rollout_ref, *, distillation=None) -> Optional[KlChoice]:
    """Refuse, at start, what this adapter cannot serve; return the TIKE choice (None when
    ``actor.kl_loss_type`` is not TIKE: then nothing is checked and verl runs as it is).

    ``actor_rollout_ref``: verl's ``actor_rollout_ref`` config (what its workers get).
    """
    choice = parse_kl_loss_type(_get(actor_rollout_ref, "actor.kl_loss_type", "low_var_kl"))
    if not choice.tike:
        return None
    why = []
    if not _get(actor_rollout_ref, "actor.use_kl_loss", False):
        why.append("actor.use_kl_loss is false: set it true (it is what makes verl run the "
                   "reference model)")
    for role in ("actor", "ref"):
        strategy = _get(actor_rollout_ref, f"{role}.strategy", "fsdp")
        if strategy not in ("fsdp", "fsdp2"):
            why.append(f"{role}.strategy={strategy!r}: only verl's FSDP engine (fsdp, fsdp2) is "
                       "supported; the Megatron engine splits the vocabulary across ranks, "
                       "which needs the vocabulary-parallel TIKE (not there yet)")
        for key in (f"{role}.ulysses_sequence_parallel_size",
                    f"{role}.fsdp_config.ulysses_sequence_parallel_size"):
            if int(_get(actor_rollout_ref, key, 1)) > 1:
                why.append(f"{key} > 1: Ulysses sequence parallelism is not supported")
        for key in (f"{role}.pad_to_length", f"{role}.fsdp_config.pad_to_length"):
            if _get(actor_rollout_ref, key, False):
                why.append(f"{key}: the static pad is not supported")
    if _get(actor_rollout_ref, "model.use_fused_kernels", False):
        why.append("model.use_fused_kernels: verl's fused kernels never form the logits TIKE "
                   "reads")
    if distillation is not None and _get(distillation, "enabled", False):
        why.append("distillation.enabled: the distillation loss replaces the actor loss")
    why += [f"the plugin could not hook {name} ({err})" for name, err in _failed.items()]
    if why:
        raise ValueError(f"actor.kl_loss_type={_get(actor_rollout_ref, 'actor.kl_loss_type')!r} "
                         "(tike_cuda's verl adapter) cannot run this configuration:\n  - "
                         + "\n  - ".join(why))
    return choice


def _check_trainer(cls, config) -> None:
    """The driver's part of the start-time checks (what the workers never see), before the
    v1 trainer ``cls`` is built on ``config``."""
    if check_config(config.actor_rollout_ref, distillation=config.get("distillation")) is None:
        return
    why = []
    if _get(config, "algorithm.rollout_correction.bypass_mode", False):
        why.append("algorithm.rollout_correction.bypass_mode: the actor's old-policy pass, which "
                   "stores the top-k ids, is skipped")
    if str(_get(config, "algorithm.kl_penalty", "kl")).startswith("tike") and \
            _get(config, "algorithm.use_kl_in_reward", False):
        why.append("algorithm.kl_penalty: TIKE is an actor-loss KL, not a reward penalty")
    base = _trainer_base()
    for name in ("_compute_old_log_prob", "_compute_ref_log_prob"):
        if getattr(cls, name) is not getattr(base.PPOTrainer, name):
            why.append(f"{cls.__name__} overrides {name}, the pass that stores TIKE's data "
                       "(tested with the v1 trainer's own passes only)")
    if why:
        raise ValueError("tike_cuda's verl adapter (actor.kl_loss_type="
                         f"{config.actor_rollout_ref.actor.kl_loss_type!r}) cannot run this "
                         "configuration:\n  - " + "\n  - ".join(why))


def _refuse_legacy_trainer(cls, config) -> None:
    if check_config(config.actor_rollout_ref) is not None:
        raise ValueError("actor.kl_loss_type=tike needs verl's v1 trainer (trainer.use_v1=true, "
                         "the default): the legacy trainer keeps only log_probs between passes")


# ---------------------------------------------------------------------------- the loss

def _without_kl(config):
    """A shallow copy of the actor config with use_kl_loss off (made once per config).
    It shares ``global_batch_info``, which verl's ppo_loss fills for the aggregation."""
    off = config.__dict__.get("_tike_without_kl")
    if off is None:
        off = copy.copy(config)
        object.__setattr__(off, "use_kl_loss", False)  # verl's configs are frozen
        object.__setattr__(config, "_tike_without_kl", off)
    return off


def ppo_loss(config, model_output, data, dp_group=None):
    """verl's ``ppo_loss`` with the KL term assembled here: the policy (and entropy) loss is
    verl's own, computed with ``use_kl_loss`` off; then, as verl adds it,

        loss += kl_loss_coef · agg(kl),   agg = loss_agg_mode over the response mask

    where ``kl`` per token is TIKE from the update pass (``tike``/``tike_bucket``) or verl's
    ``kl_penalty(log_prob, ref_log_prob, kl_loss_type)`` for verl's names (so for those the
    loss, its gradient and the ``kl_loss`` metric are verl's, bit for bit).
    """
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty
    from verl.utils.metric import Metric
    from verl.workers.utils.losses import ppo_loss as verl_ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    if not config.use_kl_loss:
        return verl_ppo_loss(config, model_output, data, dp_group)
    choice = parse_kl_loss_type(config.kl_loss_type)
    loss, metrics = verl_ppo_loss(_without_kl(config), model_output, data, dp_group)

    fields = ["response_mask"] if choice.tike else ["response_mask", "ref_log_prob"]
    padded = data.select(*fields).to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)
    if choice.tike:
        if KL_KEY not in model_output:
            raise RuntimeError(f"kl_loss_type={config.kl_loss_type!r} but the update pass produced "
                               "no TIKE values: is tike_cuda's verl plugin loaded in this worker?")
        kld = no_padding_2_padding(model_output[KL_KEY], data)
    else:
        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        kld = kl_penalty(logprob=log_prob, ref_logprob=padded["ref_log_prob"],
                         kl_penalty=config.kl_loss_type)
    kl_loss = agg_loss(loss_mat=kld, loss_mask=response_mask, loss_agg_mode=config.loss_agg_mode,
                       **config.global_batch_info)
    loss = loss + kl_loss * config.kl_loss_coef
    # logged as verl logs it, with the aggregation it gives the policy loss
    metrics["kl_loss"] = Metric(value=kl_loss, aggregation=metrics["actor/pg_loss"].aggregation)
    metrics["kl_coef"] = config.kl_loss_coef
    return loss, metrics


# ------------------------------------------------------------------ the worker side

@dataclass(frozen=True)
class _Role:
    role: str  # "actor" or "ref": which TrainingWorker of an ActorRolloutRefWorker
    choice: KlChoice


def _tag(data, **flags) -> None:
    from verl.utils import tensordict_utils as tu
    tu.assign_non_tensor(data, **flags)


def _wrap_infer_batch(orig):
    @functools.wraps(orig)
    def infer_batch(self, data):
        tike = getattr(self, "_tike", None)
        if tike is not None:
            from verl.utils import tensordict_utils as tu
            # the reference of a LoRA actor is the actor with its adapter off
            ref = tike.role == "ref" or tu.get_non_tensor_data(data, "no_lora_adapter", False)
            _tag(data, **{STAGE_KEY: "ref" if ref else "old", K_KEY: tike.choice.k})
        return orig(self, data)

    return infer_batch


def _wrap_train_mini_batch(orig):
    @functools.wraps(orig)
    def train_mini_batch(self, data):
        tike = getattr(self, "_tike", None)
        if tike is not None:
            _tag(data, **{STAGE_KEY: "update", TAIL_KEY: tike.choice.tail})
        return orig(self, data)

    return train_mini_batch


def _wrap_init_model(orig):
    @functools.wraps(orig)
    def init_model(self):
        choice = check_config(self.config, distillation=self.distillation_config)
        out = orig(self)
        if choice is not None:
            for role in ("actor", "ref"):
                worker = getattr(self, role, None)
                if worker is None:
                    continue
                hook = getattr(type(worker.engine).prepare_model_outputs, "_tike_hook", False)
                if not hook:
                    raise ValueError(f"TIKE needs verl's FSDP engine; the {role} runs "
                                     f"{type(worker.engine).__name__}")
                worker._tike = _Role(role, choice)
        return out

    return init_model


# ------------------------------------------------------------------ installation

def _patch_engine_workers(module) -> None:
    # init_model first: it holds the start-time checks, which also report failed hooks
    module.ActorRolloutRefWorker.init_model = _wrap_init_model(
        module.ActorRolloutRefWorker.init_model)
    module.ppo_loss = ppo_loss  # bound by ActorRolloutRefWorker.init_model
    module.TrainingWorker.infer_batch = _wrap_infer_batch(module.TrainingWorker.infer_batch)
    module.TrainingWorker.train_mini_batch = _wrap_train_mini_batch(
        module.TrainingWorker.train_mini_batch)


def _patch_fsdp_engine(module) -> None:
    cls = module.FSDPEngineWithLMHead
    cls.prepare_model_outputs = wrap_prepare_model_outputs(cls.prepare_model_outputs)
    module.logprobs_from_logits = logprobs_from_logits


def _wrap_init(cls, check) -> None:
    """``check(type(self), config)`` before ``cls.__init__(self, config, ...)`` builds anything."""
    orig = cls.__init__

    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        check(type(self), kwargs["config"] if "config" in kwargs else args[0])
        orig(self, *args, **kwargs)

    cls.__init__ = __init__


def _trainer_base():
    import verl.trainer.ppo.v1.trainer_base as base
    return base


_PATCHES = {
    "verl.workers.engine_workers": _patch_engine_workers,
    "verl.workers.engine.fsdp.transformer_impl": _patch_fsdp_engine,
    "verl.trainer.ppo.v1.trainer_base": lambda m: _wrap_init(m.PPOTrainer, _check_trainer),
    "verl.trainer.ppo.ray_trainer": lambda m: _wrap_init(m.RayPPOTrainer, _refuse_legacy_trainer),
}
_installed = set()
_failed = {}  # module -> why its hook could not be applied


def _patcher(name, fn):
    def apply(module):
        try:
            fn(module)
        except Exception as e:  # verl's internals moved: verl still runs, TIKE is refused
            _failed[name] = f"{type(e).__name__}: {e}"
            _log.warning("tike_cuda's verl adapter could not hook %s (%s); "
                         "actor.kl_loss_type=tike* will be refused", name, _failed[name])
        else:
            _installed.add(name)
    return apply


def installed() -> bool:
    """Whether every hook of this adapter that verl has imported so far is in place (a
    module not imported yet gets its hook at its import)."""
    import sys
    return not _failed and all(name in _installed for name in _PATCHES if name in sys.modules)


def _supported_verl() -> bool:
    try:
        found = metadata.version("verl")
    except metadata.PackageNotFoundError:
        return False
    from packaging.version import InvalidVersion, Version
    try:
        series = Version(found).release[:2]
    except InvalidVersion:
        series = None
    if series not in SUPPORTED_VERL:
        # verl's plugin loader hides import errors (DEBUG): say it where it is seen
        _log.warning("tike_cuda's verl adapter supports verl %s (tested with %s), found %s: "
                     "not installed", ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VERL),
                     TESTED_VERL, found)
        return False
    return True


if _supported_verl():
    for _name, _fn in _PATCHES.items():
        when_imported(_name, _patcher(_name, _fn))
