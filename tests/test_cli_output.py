"""What the command line prints: the tool's own lines only (library noise needs --verbose), what a command
changed, the seed, one line naming the extra to install, and no traceback when a pipe closes early."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _cli(*argv, **kw) -> subprocess.CompletedProcess:
    # A pipe, not a terminal: what CI logs and scripts see.
    return subprocess.run([sys.executable, "-m", "hidream_export.cli", *argv], capture_output=True, text=True,
                          env=ENV, timeout=600, **kw)


def test_build_off_a_terminal_is_quiet(tiny_models, built, tmp_path):
    # The shared store comes from the session's builds, so this build exports the transformer (the noisy
    # part: tracing, the onnxscript optimizer) and installs the shared components.
    shutil.copytree(built.root / ".shared", tmp_path / "engines" / ".shared")
    out = tmp_path / "engines" / "fast"
    run = _cli("build", str(tiny_models("fast")), "--variant", "fast", "--out", str(out))
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) <= 15, run.stderr
    assert not any("Warning" in line or "torchvision" in line or "constant folding" in line for line in lines)


def test_generate_quiet_prints_the_seed_and_what_changed(built, tmp_path):
    run = _cli("generate", str(built.folder("full")), "--prompt", "a", "--steps", "1", "--width", "240",
               "--height", "160", "--quiet", "-o", str(tmp_path / "a.png"))
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) <= 5 and lines[-1].startswith("seed "), lines
    assert any("rescaled to" in line and "--any-size" in line for line in lines), lines
    assert run.stdout == ""


def test_a_missing_extra_is_one_line(tiny_transformer_dir, tmp_path):
    # A runtime-only install: torch cannot be imported.
    blocker = tmp_path / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    run = subprocess.run([sys.executable, "-m", "hidream_export.cli", "export", str(tiny_transformer_dir), "--variant",
                          "dev"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert 'pip install "hidream-export[export]"' in run.stderr


def test_a_closed_pipe_is_not_an_error():
    doctor = subprocess.Popen([sys.executable, "-m", "hidream_export.cli", "doctor", "--json"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = doctor.stdout.read(10)  # `| head -c 10`
    doctor.stdout.close()
    err = doctor.stderr.read().decode()
    assert doctor.wait(timeout=120) == 0 and head and "Traceback" not in err and "BrokenPipe" not in err, err


def test_verbose_shows_library_logs(tiny_transformer_dir, tmp_path):
    shutil.copytree(tiny_transformer_dir, tmp_path / "ckpt")
    run = _cli("info", str(tmp_path / "ckpt"), "--verbose")
    assert run.returncode == 0 and "parameters" in run.stdout
