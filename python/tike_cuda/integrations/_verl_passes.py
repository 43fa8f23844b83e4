"""The data flow of tike_cuda's verl plugin, per micro-batch (see verl.py for the whole).

verl's FSDP engine hands the logits of a micro-batch, already divided by the temperature,
to a logits processor; :func:`wrap_prepare_model_outputs` gives it one per pass:

- old policy: ``topk_indices`` on the response rows → ``tike_support`` [k] int32;
- reference: ``sparse_reference`` on that support ∪ {sampled token} → ``tike_ref_idx``,
  ``tike_ref_logprobs`` [k+1], ``tike_ref_tail_logmass``;
- update: ``topk_kl`` with that SparseReference → ``tike_kl``, one value per row, which
  the engine packs as it packs ``log_probs`` and the actor loss aggregates.
"""
from __future__ import annotations

import functools
import threading

import torch

import tike_cuda

DEFAULT_K = 16
# What each pass stores (per response token) in verl's TransferQueue.
SUPPORT_KEY = "tike_support"
REF_KEYS = ("tike_ref_idx", "tike_ref_logprobs", "tike_ref_tail_logmass")
KL_KEY = "tike_kl"  # the per-token TIKE of the update (the model output the loss reads)
STORED_KEYS = (SUPPORT_KEY,) + REF_KEYS


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A per-response-token field as one row per token (sequence-major)."""
    return t.values() if t.is_nested else t.reshape(-1, *t.shape[2:])


def _response_rows(data, n_rows: int, device):
    """Rows of the packed logits that predict response tokens, and the response lengths.

    Row t of a sequence predicts token t + 1 (the logits are read against the rolled ids),
    so a response of length R ending at packed offset e is predicted by rows
    [e − R − 1, e − 1), the rows verl's ``no_padding_2_padding`` takes. Worked out on the
    host from the offsets (the one host sync per micro-batch); ``rows`` on ``device``."""
    ends = data["input_ids"].offsets()[1:].cpu()
    responses = data["responses"]
    lens = responses.offsets().diff().cpu() if responses.is_nested else \
        torch.full_like(ends, responses.shape[1])
    if int(ends[-1]) != n_rows:
        raise RuntimeError(f"{n_rows} rows of logits for {int(ends[-1])} tokens: a padded "
                           "layout (pad_to_length, sequence parallelism) is not supported")
    starts = torch.repeat_interleave(ends - lens - 1, lens)
    within = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens,
                                                                     lens)
    return (starts + within).to(device), lens


def _nested(values: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=offsets[1:])
    return torch.nested.nested_tensor_from_jagged(values, offsets.to(values.device))


def _scatter(values: torch.Tensor, rows: torch.Tensor, n_rows: int, fill) -> torch.Tensor:
    out = torch.full((n_rows, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    out[rows] = values
    return out


def _stored(data, key: str, stage: str, missing: str) -> torch.Tensor:
    if key not in data.keys():
        raise RuntimeError(f"TIKE's {stage}: the batch has no '{key}' ({missing})")
    return _flat(data[key])


def _old_pass(logits, rows, lens, mask, k):
    """The old policy's top-k ids, the support S of the sparse reference."""
    support = tike_cuda.topk_indices(logits, k, mask=mask)
    return {SUPPORT_KEY: _nested(support[rows], lens)}


def _ref_pass(logits, data, sampled, rows, lens, mask):
    """The reference on S~ = support ∪ {o}: log q there and the tail's log-mass."""
    support = _stored(data, SUPPORT_KEY, "reference pass",
                      "the old-policy pass stored no top-k ids: bypass mode, or a trainer "
                      "that replaces _compute_old_log_prob?")
    full = _scatter(support.to(logits.device), rows, logits.shape[0], -1)
    sref = tike_cuda.sparse_reference(logits, full, sampled_tokens=sampled, mask=mask)
    parts = (sref.idx, sref.logprobs, sref.tail_logmass)
    return {key: _nested(t[rows], lens) for key, t in zip(REF_KEYS, parts)}


def _update_pass(logits, data, sampled, rows, lens, mask, tail):
    """TIKE per token on the stored S~, with the current policy's p and the IS weight
    exp(log p(o) − old_log_prob): differentiable in the logits."""
    missing = "the reference pass stored no sparse reference: is tike_cuda's verl plugin " \
              "loaded in the reference worker?"
    idx, logq, tail_q = (_stored(data, key, "update", missing).to(logits.device)
                         for key in REF_KEYS)
    n = logits.shape[0]
    sref = tike_cuda.SparseReference(_scatter(idx, rows, n, -1),
                                     _scatter(logq, rows, n, float("-inf")),
                                     _scatter(tail_q, rows, n, 0.0), idx.shape[-1] - 1)
    old = _scatter(_flat(data["old_log_probs"]).to(logits.device, torch.float32), rows, n, 0.0)
    kl = tike_cuda.topk_kl(logits, sref, sref.k, sampled_tokens=sampled, old_logprobs=old,
                           mask=mask, tail=tail)
    return {KL_KEY: kl.unsqueeze(0)}


# Non-tensor flags of a batch: which pass it is in, and what that pass needs.
STAGE_KEY, K_KEY, TAIL_KEY = "tike_stage", "tike_k", "tike_tail"
_state = threading.local()  # set while an update's logits are shared with TIKE


def _processor(stage, micro_batch, output_args, captured):
    """The logits processor handed to verl's prepare_model_outputs for one micro-batch."""
    from verl.utils import tensordict_utils as tu

    def process(student_logits, data):
        logits = student_logits.squeeze(0)  # [rows, V], already divided by the temperature
        sampled = output_args["input_ids_rmpad_rolled"].reshape(-1)
        rows, lens = _response_rows(data, logits.shape[0], logits.device)
        mask = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        mask[rows] = _flat(data["response_mask"]).to(device=logits.device, dtype=torch.bool)
        if stage == "update":
            out = _update_pass(logits, data, sampled, rows, lens, mask,
                               tu.get_non_tensor_data(data, TAIL_KEY, "none"))
            captured.update(out)
            return out  # one value per row: verl packs it as it packs log_probs
        if stage == "old":
            captured.update(_old_pass(logits, rows, lens, mask,
                                      tu.get_non_tensor_data(data, K_KEY, DEFAULT_K)))
        else:
            captured.update(_ref_pass(logits, data, sampled, rows, lens, mask))
        return {}  # [k]-wide: packed per response token here, not per row by verl

    return process


def wrap_prepare_model_outputs(orig):
    @functools.wraps(orig)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        from verl.utils import tensordict_utils as tu

        stage = tu.get_non_tensor_data(micro_batch, STAGE_KEY, None)
        if stage is None:
            return orig(self, output, output_args, micro_batch, logits_processor_func)
        if tu.get_non_tensor_data(micro_batch, "distillation_use_topk", False):
            raise ValueError("TIKE and top-k distillation cannot share verl's logits processor")
        captured = {}
        tu.assign_non_tensor(micro_batch, distillation_use_topk=True)
        _state.logits_shared = stage == "update"
        try:
            model_output = orig(self, output, output_args, micro_batch,
                                _processor(stage, micro_batch, output_args, captured))
        finally:
            _state.logits_shared = False
            tu.assign_non_tensor(micro_batch, distillation_use_topk=False)
        if not captured:
            raise RuntimeError(f"{type(self).__name__} handed no logits to TIKE's {stage} pass "
                               "(fused kernels?)")
        if stage != "update":
            model_output.update(captured)
        return model_output

    prepare_model_outputs._tike_hook = True
    return prepare_model_outputs


def logprobs_from_logits(*args, **kwargs):
    """verl's ``logprobs_from_logits``, where its engine calls it. verl's flash-attn
    cross-entropy may write its gradient over the logits in its backward; TIKE's backward
    reads those logits afterwards, so while they are shared it must not."""
    from verl.utils import torch_functional
    if getattr(_state, "logits_shared", False):
        kwargs["inplace_backward"] = False
    return torch_functional.logprobs_from_logits(*args, **kwargs)
