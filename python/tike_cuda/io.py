"""Read and write the logits files that ``tike-cuda audit`` and ``tike-cuda variance`` take.

A file is a flat mapping of names to arrays, as ``.pt`` (``torch.save`` of a dict of
tensors), ``.safetensors`` or ``.npz``. Keys (``P = logits.shape[:-1]``, the positions):

================ ============ ========================================================
key              shape        meaning
================ ============ ========================================================
``logits``       ``[*P, V]``  policy logits (float; float64 is read as float32), required
``ref_logits``   ``[*P, V]``  reference logits, same shape; required by audit/variance
``tokens``       ``P``        sampled token ids (int); needed by the sampled estimators
``old_logprobs`` ``P``        rollout log pi_old(token) (float): TIKE's importance weight
``mask``         ``P``        bool or 0/1 (int or float): positions to use (the response mask)
``seq_id``       ``P``        int: the sequence a position belongs to (variance study);
                              without it a ``[S, T, V]`` file is S sequences of T
================ ============ ========================================================

Every problem is a ValueError naming the file (and the key) and saying what to do.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import _checks
from .report import EXTRA

__all__ = ["KEYS", "load_logits", "save_logits"]

KEYS = ("logits", "ref_logits", "tokens", "old_logprobs", "mask", "seq_id")
_SUFFIXES = (".pt", ".safetensors", ".npz")
_HOW = "write it with tike_cuda.io.save_logits (or torch.save of a dict of tensors)"


def _load_pt(path: Path):
    try:
        # mmap: positions are then read chunk by chunk instead of all up front
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        # mmap needs the zip format; its error says so even for a corrupt file, so read
        # once more without it (a legacy file loads; a corrupt one gives the real error)
        return torch.load(path, map_location="cpu", weights_only=True)


def _read(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {_SUFFIXES}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); {_HOW}")
    if suffix == ".pt":
        obj = _load_pt(path)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}; {_HOW}")
        return obj
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ModuleNotFoundError:
            raise ValueError(f"{path}: reading .safetensors files needs the safetensors package "
                             f"({EXTRA})") from None
        return load_file(str(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {key: torch.from_numpy(np.ascontiguousarray(z[key])) for key in z.files}


def load_logits(path: str | os.PathLike, *, required=("logits", "ref_logits")) -> dict:
    """Load and validate a logits file; returns a dict holding only the known keys.

    ``required`` lists keys that must be present beyond ``logits``. Unknown keys are
    ignored. ``mask`` comes back as bool, ``tokens``/``seq_id`` as int64.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (check the path)")
    try:
        raw = _read(path)
    except ValueError:
        raise
    except Exception as err:  # corrupt or truncated archives surface as many types
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: cannot read as a {path.suffix} file ({type(err).__name__}: "
                         f"{first}); {_HOW}") from err
    for key in ("logits",) + tuple(required):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r} (found {sorted(raw)}); "
                             f"expected keys: {', '.join(KEYS)}")
    out = {}
    for key in KEYS:
        if key in raw:
            t = raw[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: key {key!r} is a {type(t).__name__}, not a tensor")
            out[key] = t
    _validate(path, out)
    return out


def _validate(path, d):
    z = d["logits"]
    if not z.is_floating_point() or z.dim() < 2 or z.shape[-1] < 2:
        raise ValueError(f"{path}: key 'logits' must be a float array [..., V] with V >= 2 "
                         f"and at least one position, got {z.dtype} {tuple(z.shape)}")
    if z.dtype not in _checks.LOGIT_DTYPES:  # float64: the kernels' widest type is float32
        d["logits"] = z = z.float()
    if "ref_logits" in d:
        zr = d["ref_logits"]
        if zr.shape != z.shape or not zr.is_floating_point():
            raise ValueError(f"{path}: key 'ref_logits' has {zr.dtype} {tuple(zr.shape)}, "
                             f"expected a float array of logits' shape {tuple(z.shape)}")
        if zr.dtype != z.dtype:
            d["ref_logits"] = zr.to(z.dtype)
    pos = z.shape[:-1]
    for key, kind in (("tokens", "int"), ("old_logprobs", "float"), ("mask", "bool"),
                      ("seq_id", "int")):
        if key not in d:
            continue
        t = d[key]
        if t.shape != pos:
            raise ValueError(f"{path}: key {key!r} has shape {tuple(t.shape)}, expected "
                             f"logits.shape[:-1] = {tuple(pos)}")
        if kind == "int":
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{path}: key {key!r} must hold integers, got {t.dtype}; "
                                 "save token ids as an integer tensor")
            d[key] = t = t.long()
        elif kind == "float":
            if not t.is_floating_point():
                raise ValueError(f"{path}: key {key!r} must hold floats, got {t.dtype}")
            d[key] = t.float()
        else:
            try:
                d[key] = _checks.as_bool_mask(t, "key 'mask'")
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: {err}") from None
    if "tokens" in d:
        tok = d["tokens"]
        if "mask" in d:
            tok = tok[d["mask"]]
        if tok.numel() and (tok.min() < 0 or tok.max() >= z.shape[-1]):
            raise ValueError(f"{path}: key 'tokens' holds ids outside [0, {z.shape[-1]}) "
                             f"at unmasked positions")


def save_logits(path: str | os.PathLike, **tensors) -> Path:
    """Write a logits file (format from the suffix) with the keys of :data:`KEYS`."""
    path = Path(path)
    unknown = set(tensors) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; expected a subset of {KEYS}")
    tensors = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    suffix = path.suffix.lower()
    if suffix == ".pt":
        torch.save(tensors, path)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(tensors, str(path))
    elif suffix == ".npz":
        np.savez(path, **{key: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
                          for key, t in tensors.items()})
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {_SUFFIXES}")
    return path
