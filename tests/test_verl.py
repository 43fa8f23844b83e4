"""The verl tests, run in verl's own environment.

verl 0.9.1 pins transformers below what the [trl] extra pins, so scripts/bootstrap.sh puts
the [verl] extra in a second environment, .venv-verl (``TIKE_VERL_VENV`` to move it), and
this test runs tests/test_verl_*.py there, bounded in time. (Where verl is importable,
conftest.py collects those files directly and skips this one.) Without that environment it
skips, except under CI (``CI`` set, as .ci/run runs), where it fails.
"""
import contextlib
import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 1500  # the whole verl suite; each of its tests has its own limit too


def test_verl_suite_in_its_environment(capsys):
    venv = Path(os.environ.get("TIKE_VERL_VENV", ROOT / ".venv-verl"))
    python = venv / "bin" / "python"
    if not python.exists():
        why = f"no verl environment at {venv}: scripts/bootstrap.sh makes it"
        if os.environ.get("CI") and os.environ.get("TIKE_VERL") != "0":
            pytest.fail(why)  # CI's bootstrap makes it: its absence is a failure there
        pytest.skip(why)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_verl_*.py"))
    assert files, "no tests/test_verl_*.py"
    # Its own session, killed whole afterwards: Ray's daemons go with it even when the
    # suite is stopped (a pytest-timeout exit skips ray.shutdown). Output to a file, so a
    # straggler holding the pipe cannot keep this waiting.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 *files], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            proc.wait(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        log.seek(0)
        out = log.read()
    if returncode == -signal.SIGKILL:
        pytest.fail(f"the verl suite ran past {LIMIT_S} s:\n{out[-6000:]}")
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    with capsys.disabled():  # the inner count, in the outer run's log
        print(f"\n[tests/test_verl_*.py in {venv.name}] {summary}")
    assert returncode == 0, out[-6000:]
    assert re.search(r"\d+ passed", summary) and not re.search(r"skipped|failed|error", summary), \
        out[-6000:]
