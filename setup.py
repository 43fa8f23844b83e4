"""Build tike_cuda._C: CPU kernels always, CUDA kernels (sm_90 by default) when nvcc is found.

Environment switches:
  TIKE_CUDA=0 / 1        force the CUDA part off / on (default: on when nvcc is found;
                         never decided from torch.cuda.is_available(), so a GPU-less
                         build machine still produces GPU kernels)
  CUDA_HOME              where nvcc lives (default /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST   architectures to compile for (default "9.0")
  MAX_JOBS               parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = Path(home) / "bin" / "nvcc"
    if nvcc.is_file():
        return home
    found = shutil.which("nvcc")
    return str(Path(found).resolve().parent.parent) if found else None


def _want_cuda():
    flag = os.environ.get("TIKE_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return None
    home = _find_nvcc()
    if flag in ("1", "on", "true", "yes") and home is None:
        sys.exit("TIKE_CUDA=1 but no nvcc was found (set CUDA_HOME)")
    return home


def _wheel_cuda_includes():
    """Headers (cublas, cusparse, ...) that ATen/cuda includes ship in the nvidia pip wheels."""
    out = []
    for entry in sys.path:
        out += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        out += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(p for p in out if os.path.isdir(p)))


def _cuda_library_dirs(cuda_home):
    """Toolkit dirs holding libcudart.so: torch links -lcudart from CUDA_HOME/lib64 only,
    and some toolkit layouts keep it in lib/ or targets/<arch>/lib/."""
    candidates = [os.path.join(cuda_home, d) for d in ("lib64", "lib")]
    candidates += sorted(glob.glob(os.path.join(cuda_home, "targets", "*", "lib")))
    return [d for d in candidates if os.path.exists(os.path.join(d, "libcudart.so"))]


def _extensions():
    cuda_home = _want_cuda()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import (and would otherwise
        # guess it from the nvcc on PATH, e.g. /usr/local for /usr/local/bin/nvcc).
        os.environ.setdefault("CUDA_HOME", cuda_home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(
        glob.glob("csrc/kernels/*_cpu.cpp"))
    # No -std flag: torch.utils.cpp_extension sets the one its headers need (C++20 for
    # recent torch, C++17 for older ones).
    cxx = ["-O3", "-fno-math-errno", "-Wno-psabi", "-DTIKE_HAVE_PYTHON_MODULE"]
    # at::parallel_for is an inline OpenMP region in ATen's headers: without -fopenmp
    # it silently runs on one thread.
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    include_dirs = [str(ROOT / "csrc")]
    if cuda_home is None:
        return [CppExtension("tike_cuda._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=link)]

    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-DTIKE_WITH_CUDA"]
    # The toolkit's own headers first: the wheels' copies of cuda_runtime_api.h etc. lack
    # crt/; the wheels only fill in what the toolkit lacks (cublas, cusparse headers).
    toolkit = [os.path.join(cuda_home, "include")]
    return [CUDAExtension("tike_cuda._C", sources,
                          include_dirs=include_dirs + toolkit + _wheel_cuda_includes(),
                          library_dirs=_cuda_library_dirs(cuda_home),
                          extra_compile_args={"cxx": cxx + ["-DTIKE_WITH_CUDA"], "nvcc": nvcc},
                          extra_link_args=link)]


# What tike_cuda.testing.load_emulated() compiles (the CPU emulation of the CUDA kernels),
# shipped as package data so that it also works from an installed package.
_EMU_SOURCES = ("emu/*.h", "emu/*.cpp", "cuda/*.h", "kernels/*.cuh", "kernels/*.h", "*.h",
                "cpu/grad_cache.*")


class _BuildPy(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "tike_cuda" / "_csrc"
        for pattern in _EMU_SOURCES:
            for src in sorted((ROOT / "csrc").glob(pattern)):
                out = dest / src.relative_to(ROOT / "csrc")
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out)


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": _BuildPy}


setup(
    name="tike_cuda",
    version="0.1.0",
    description="Top-k importance-weighted KL (TIKE) for LLM RL losses: CPU and CUDA kernels",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "analysis": ["matplotlib", "tqdm", "safetensors"],
        "test": ["pytest", "hypothesis", "matplotlib", "tqdm", "safetensors"],
        # tike_cuda.integrations.trl reads trl's GRPOTrainer internals: the versions its
        # tests pass with (tests/test_trl.py), peft for the adapter-as-reference path.
        "trl": ["trl==1.16.0", "transformers==5.24.0", "tokenizers==0.23.3", "datasets==5.2.0",
                "accelerate==1.15.0", "peft==0.21.2"],
        # tike_cuda.integrations.verl hooks into verl 0.9's workers: the versions its tests
        # (tests/test_verl_*.py) pass with. They clash with [trl]'s (transformers): give
        # each its own environment (scripts/bootstrap.sh makes .venv-verl).
        "verl": ["verl[verl-core]==0.9.1", "transformers==5.10.4", "tokenizers==0.22.2",
                 "ray==2.60.0", "TransferQueue==0.1.11", "tensordict==0.10.0",
                 "hydra-core==1.3.8", "omegaconf==2.3.1"],
    },
    entry_points={"console_scripts": ["tike-cuda=tike_cuda.__main__:main"],
                  # loaded by `import verl` (verl.__init__); TIKE where actor.kl_loss_type asks
                  "verl.plugins": ["tike_cuda = tike_cuda.integrations.verl"]},
    zip_safe=False,
)
