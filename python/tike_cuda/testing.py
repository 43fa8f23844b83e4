"""The CUDA kernels on a machine without a GPU: an emulation of the CUDA execution model.

The kernel sources nvcc compiles (``csrc/kernels/*.cuh``) and the CUDA build's own glue
(``csrc/cuda/ops_glue.h``) are compiled with the host C++ compiler against a small runtime
(``csrc/emu``) that runs every CUDA thread as a fiber, with barriers and warp operations as
rendezvous. See docs/emulation.md.

    from tike_cuda.testing import emulated_cuda, load_emulated

    load_emulated()                        # built on first use, then cached
    torch.ops.tike_cuda_emu.topk_kl(...)   # the schemas of torch.ops.tike_cuda, CPU tensors

    with emulated_cuda(order="reversed"):  # the public API (and autograd) on the emulation
        kl = tike_cuda.topk_kl(logits, ref, k=16)
        kl.sum().backward()

Building needs the CUDA toolkit's headers (``cuda_runtime.h``, ``cuda_bf16.h``,
``cuda_fp16.h`` and ``crt/``), found through ``CUDA_HOME``/``CUDA_PATH``, ``nvcc`` on the
``PATH``, ``/usr/local/cuda`` or the ``nvidia-cuda-runtime`` + ``nvidia-cuda-crt`` wheels;
no nvcc and no GPU. The build goes to ``$TIKE_EMU_CACHE`` (default
``~/.cache/tike_cuda/emu``), one folder per content of the sources.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["load_emulated", "emulated_cuda", "set_thread_order", "counters", "warp_op_sites",
           "reset_counters", "ORDERS"]

ORDERS = ("forward", "reversed", "shuffled")

# Compiled sources (relative to csrc/); every header they include is hashed as well.
_SOURCES = ("emu/ops_emu.cpp", "emu/runtime.cpp", "emu/fiber.cpp", "emu/selftest.cpp",
            "cpu/grad_cache.cpp")
_HASHED = ("emu/*", "cuda/*.h", "kernels/*.cuh", "kernels/*.h", "*.h", "cpu/grad_cache.*")
# No -ffast-math ever (NaN/inf semantics are what the tests check). -fno-extern-tls-init:
# the `extern __shared__` arrays are thread_local and defined in the same library.
# -fno-strict-aliasing: the kernels read bf16/fp16 through uint16_t and uint4.
_CFLAGS = ["-O2", "-fno-strict-aliasing", "-fno-extern-tls-init", "-fno-math-errno", "-Wno-psabi",
           "-Wno-unknown-pragmas"]

_lock = threading.Lock()
_loaded: Optional[str] = None


def _csrc() -> Path:
    """The C++ sources: shipped in the package (``_csrc``) or the source tree's ``csrc``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent.parent / "csrc"):
        if (cand / "emu" / "ops_emu.cpp").is_file():
            return cand
    raise RuntimeError("tike_cuda.testing: the emulation sources (csrc/emu) are not installed "
                       "with this package; reinstall it from the source tree")


def _has_headers(inc: Path) -> bool:
    return all((inc / h).is_file() for h in ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h",
                                              "crt/host_config.h"))


def cuda_include_dir() -> Optional[str]:
    """The folder of the CUDA toolkit's headers, or None when none is found."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    homes.append("/usr/local/cuda")
    cands = [Path(h) / "include" for h in homes if h]
    for entry in sys.path:  # the nvidia-cuda-runtime / nvidia-cuda-crt wheels
        cands += [Path(p) for p in sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "include")))]
        cands += [Path(p) for p in sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_runtime", "include")))]
    for inc in cands:
        if _has_headers(inc):
            return str(inc)
    return None


def _digest(root: Path, extra: List[str]) -> str:
    h = hashlib.sha256()
    files = sorted({p for pat in _HASHED for p in root.glob(pat) if p.is_file()})
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()


def load_emulated(verbose: bool = False) -> str:
    """Build (first use, then cached) and load the emulated CUDA ops; returns the library path.

    Registers ``torch.ops.tike_cuda_emu.*`` (the schemas of ``torch.ops.tike_cuda.*``,
    taking CPU tensors) and the emulation's controls ``torch.ops.tike_emu.*``. Raises
    RuntimeError when the CUDA headers are missing or the build fails.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        import tike_cuda  # noqa: F401  (tike_cuda._C registers the schemas copied below)
        from torch.utils import cpp_extension

        root = _csrc()
        inc = cuda_include_dir()
        if inc is None:
            raise RuntimeError(
                "tike_cuda.testing: the CUDA emulation needs the CUDA toolkit's headers "
                "(cuda_runtime.h, cuda_bf16.h, cuda_fp16.h, crt/): install the toolkit and set "
                "CUDA_HOME, or `pip install nvidia-cuda-runtime nvidia-cuda-crt`")
        key = _digest(root, [torch.__version__, inc, " ".join(_CFLAGS), sys.version])[:16]
        cache = Path(os.environ.get("TIKE_EMU_CACHE") or
                     Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") /
                     "tike_cuda" / "emu")
        build = cache / key
        build.mkdir(parents=True, exist_ok=True)
        path = cpp_extension.load(
            name=f"tike_cuda_emu_{key}", sources=[str(root / s) for s in _SOURCES],
            extra_cflags=_CFLAGS, extra_include_paths=[str(root), inc],
            build_directory=str(build), is_python_module=False, verbose=verbose)
        if not hasattr(torch.ops.tike_cuda_emu, "topk_kl"):
            raise RuntimeError("tike_cuda.testing: the emulated ops did not register (was "
                               "tike_cuda._C loaded first?)")
        _loaded = str(path)
        return _loaded


def set_thread_order(order: str = "forward", seed: int = 0) -> None:
    """How the emulation schedules a block's threads between rendezvous: 'forward' (thread
    0 first), 'reversed' or 'shuffled' (a new random order from ``seed`` every round)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    load_emulated()
    torch.ops.tike_emu.set_schedule(order, int(seed))


def counters() -> dict:
    """What the emulation has run since the last :func:`reset_counters`."""
    load_emulated()
    names = ("launches", "blocks", "barriers", "warp_ops", "switches")
    return dict(zip(names, torch.ops.tike_emu.counters()))


def warp_op_sites() -> dict:
    """Completed warp rendezvous per call site since the last reset, e.g.
    ``{"kernels/topk_select.cuh:213 __any_sync": 381, ...}``: how often a path was taken."""
    load_emulated()
    out = {}
    for entry in torch.ops.tike_emu.warp_op_sites():
        site, n = entry.rsplit(" ", 1)
        out[site] = int(n)
    return out


def reset_counters() -> None:
    load_emulated()
    torch.ops.tike_emu.reset_counters()


class emulated_cuda:
    """Within this context, every ``torch.ops.tike_cuda.*`` call on CPU tensors runs the
    emulated CUDA kernels (and the CUDA glue) instead of the CPU kernels: the public API,
    its autograd formulas, the in-place backward, ``torch.compile`` and ``opcheck`` go
    through unchanged.

    How: the emulated ops are registered as the CPU kernels of ``tike_cuda::*`` for the
    duration (a ``torch.library.Library`` whose registrations are removed on exit, which
    brings the CPU kernels back). The switch is process-wide, not per thread; contexts
    nest. ``order``/``seed``: the thread order (see :func:`set_thread_order`), restored to
    forward on exit.
    """

    _active = []  # the entered contexts, innermost last

    def __init__(self, order: str = "forward", seed: int = 0):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order, self.seed = order, int(seed)
        self._lib = None

    def __enter__(self):
        load_emulated()
        if not emulated_cuda._active:
            self._lib = _override_cpu_kernels()
        emulated_cuda._active.append(self)
        torch.ops.tike_emu.set_schedule(self.order, self.seed)
        return self

    def __exit__(self, *exc):
        emulated_cuda._active.remove(self)
        if self._lib is not None:
            self._lib._destroy()
            self._lib = None
        outer = emulated_cuda._active[-1] if emulated_cuda._active else None
        torch.ops.tike_emu.set_schedule(outer.order if outer else "forward",
                                        outer.seed if outer else 0)
        return False


def _override_cpu_kernels():
    """Registers every torch.ops.tike_cuda_emu op as the CPU kernel of its tike_cuda op."""
    import warnings
    lib = torch.library.Library("tike_cuda", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid")  # the point of it
        for qualname in torch._C._dispatch_get_all_op_names():
            ns, _, name = qualname.partition("::")
            if ns != "tike_cuda_emu":
                continue
            name, _, overload = name.partition(".")
            emu_op = getattr(getattr(torch.ops.tike_cuda_emu, name), overload or "default")
            lib.impl(name + ("." + overload if overload else ""),
                     lambda *a, _op=emu_op, **kw: _op(*a, **kw), "CPU")
    return lib
