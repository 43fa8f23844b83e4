"""The verl tests, run in verl's own environment.

verl 0.9.1 pins transformers below what the [trl] extra pins, so scripts/bootstrap.sh puts
the [verl] extra in a second environment, .venv-verl (``TIKE_VERL_VENV`` to move it), and
this test runs tests/test_verl_*.py there, bounded in time. (Where verl is importable,
conftest.py collects those files directly and skips this one.)
"""
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 1500  # the whole verl suite; each of its tests has its own limit too


def test_verl_suite_in_its_environment(capsys):
    venv = Path(os.environ.get("TIKE_VERL_VENV", ROOT / ".venv-verl"))
    python = venv / "bin" / "python"
    if not python.exists():
        if os.environ.get("TIKE_VERL") == "0":
            pytest.skip("TIKE_VERL=0: no verl environment")
        pytest.fail(f"no verl environment at {venv}: run scripts/bootstrap.sh "
                    "(TIKE_VERL=0 skips the verl tests)")
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_verl_*.py"))
    assert files, "no tests/test_verl_*.py"
    # its own session: Ray's processes go with it, also when it is stopped for time
    proc = subprocess.Popen([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *files], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the verl suite ran past {LIMIT_S} s:\n{out[-6000:]}")
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    with capsys.disabled():  # the inner count, in the outer run's log
        print(f"\n[tests/test_verl_*.py in {venv.name}] {summary}")
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"\d+ passed", summary) and not re.search(r"skipped|failed|error", summary), \
        out[-6000:]
