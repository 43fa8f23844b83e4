"""Every CPU instruction-set path this machine can run, against the float64 reference.

The CPU kernels are compiled once per path (AVX-512, AVX2, baseline SSE2/NEON) and the
path is chosen once, at import (TIKE_CPU_ISA, else the best one). The rest of the suite
runs the path this process chose; here each other path runs the op tests in a child
process with TIKE_CPU_ISA set, under a time limit.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tike_cuda

HERE = Path(__file__).resolve().parent
PATHS = ["avx512", "avx2", tike_cuda._C.CPU_ISAS.split(", ")[-1]]  # the baseline is last
# The op tests each path must pass: values and gradients against the float64 reference.
OP_TESTS = ["test_topk_kl.py", "test_full_kl.py", "test_token_logprobs.py",
            "test_extreme_inputs.py", "test_sparse.py", "test_distributed_shard_op.py"]
TIME_LIMIT_S = 600


def _env(isa):
    env = dict(os.environ, TIKE_CPU_ISA=isa)
    pkg = str(Path(tike_cuda.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _python(isa, code):
    return subprocess.run([sys.executable, "-c", code], env=_env(isa), capture_output=True,
                          text=True, timeout=120)


def test_the_active_path_is_reported():
    assert tike_cuda.cpu_isa() in tike_cuda.cpu_isas()
    assert tike_cuda.cpu_isas()[-1] in ("sse2", "neon", "generic")  # always runnable
    if "TIKE_CPU_ISA" not in os.environ:
        assert tike_cuda.cpu_isa() == tike_cuda.cpu_isas()[0]  # auto: the best one


@pytest.mark.parametrize("isa", PATHS)
def test_forced_path(isa):
    if isa not in tike_cuda.cpu_isas():
        r = _python(isa, "import tike_cuda")
        assert r.returncode != 0
        assert f"cannot run the {isa} path" in r.stderr and "TIKE_CPU_ISA" in r.stderr
        pytest.skip(f"this CPU cannot run {isa} (its refusal was checked)")
    r = _python(isa, "import tike_cuda; print(tike_cuda.cpu_isa())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [isa]
    if isa == tike_cuda.cpu_isa():
        return  # this process's path: the rest of the suite runs the op tests on it
    # The kernels' tests; not the CUDA kernels (a GPU or their emulation), nor what does not
    # depend on the path (tracing and registration, the benchmark harness, the README).
    select = "not cuda and not emu and not compile and not opcheck and not bench and not readme"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", select]
    r = subprocess.run(cmd + [str(HERE / t) for t in OP_TESTS], env=_env(isa), cwd=HERE,
                       capture_output=True, text=True, timeout=TIME_LIMIT_S)
    assert r.returncode == 0, f"{isa} path:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout.splitlines()[-1]


@pytest.mark.parametrize("value", ["avx1024", "sse4"])
def test_an_unknown_path_is_refused(value):
    r = _python(value, "import tike_cuda")
    assert r.returncode != 0
    assert f"TIKE_CPU_ISA={value} is not a CPU path" in r.stderr
    assert "this CPU runs:" in r.stderr


def test_the_path_name_is_case_insensitive_and_auto_is_the_best():
    r = _python("AUTO", "import tike_cuda; print(tike_cuda.cpu_isa())")
    assert r.returncode == 0 and r.stdout.split() == [tike_cuda.cpu_isas()[0]]
    base = tike_cuda.cpu_isas()[-1]
    r = _python(base.upper(), "import tike_cuda; print(tike_cuda.cpu_isa())")
    assert r.returncode == 0 and r.stdout.split() == [base]
