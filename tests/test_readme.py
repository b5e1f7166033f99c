"""Every command block of the README runs as written, on the tiny checkpoints: exit 0, no traceback.

The real paths are swapped for the session's tiny model folders (/models/HiDream-I1-* -> a tiny model
folder of that variant, /models/Meta-Llama-3.1-8B-Instruct -> its Llama), everything runs in a fresh
working folder, and the Full engine folder and the shared store are seeded from the session's build (same files,
so the commands reuse them as a user's second run would). Not run here: creating the venv and
`pip install` (CI does exactly that with the same line) and the test command itself, and the `sh` blocks:
servers and containers, which tests/test_serve.py starts on loopback ports with bounded lifetimes.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from hidream_export.cli import main as cli_main
from hidream_export.testing.loras import DETAIL_MODULES, STYLE_MODULES, random_factors, write_lora
from hidream_export.testing.model_folder import LLAMA_SUBDIR

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = ("python3 -m venv", ". .venv/bin/activate", "pip install", "python -m pytest")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _commands() -> list[str]:
    out = []
    for block in _blocks("bash"):
        pending = ""
        for line in block.splitlines():
            line = pending + line.split("  #")[0].strip()
            if line.endswith("\\"):  # a continued command: joined with the next line, as the shell does
                pending = line[:-1]
                continue
            pending = ""
            out += [c.strip() for c in line.split("&&") if c.strip()]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models, built):
    root = tmp_path_factory.mktemp("readme")
    for name in ("full", ".shared"):  # the Full build and the shared store; the README builds Dev itself
        shutil.copytree(built.root / name, root / "engines" / name, symlinks=True)
    # The README's LoRA files, in the diffusers layout, for the tiny model.
    write_lora(root / "style.safetensors", random_factors("tiny", STYLE_MODULES, rank=4, seed=1))
    write_lora(root / "detail.safetensors", random_factors("tiny", DETAIL_MODULES, rank=8, seed=2))
    return root


def _run(command: str, workdir: Path, tiny_models) -> tuple[int, str]:
    swaps = {"/models/HiDream-I1-Full": tiny_models("full"), "/models/HiDream-I1-Dev": tiny_models("dev"),
             "/models/Meta-Llama-3.1-8B-Instruct": tiny_models("full") / LLAMA_SUBDIR}
    for real, tiny in swaps.items():
        command = command.replace(real, str(tiny))
    argv = shlex.split(command)
    assert argv[0] == "hidream-export", f"README command not covered by this test: {command}"
    err = io.StringIO()
    with contextlib.chdir(workdir), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main(argv[1:])
    return rc, err.getvalue()


def test_the_readme_commands_run_as_written(workdir, tiny_models):
    commands = [c for c in _commands() if not c.startswith(NOT_RUN)]
    assert any(c.startswith("hidream-export demo") for c in commands)
    # demo writes checkpoints/tiny-fast itself; seed it with the session's (same generator, same seed).
    shutil.copytree(tiny_models("fast"), workdir / "checkpoints" / "tiny-fast")
    for command in commands:
        rc, err = _run(command, workdir, tiny_models)
        assert rc == 0 and "Traceback" not in err, f"{command}\n{err}"


def test_the_readme_server_blocks_hold_only_serving_commands():
    """The `sh` blocks are left to the serving tests: nothing else may hide there."""
    blocks = _blocks("sh")
    assert blocks
    for block in blocks:
        for line in block.splitlines():
            words = line.split()
            assert not words or words[0] in ("curl", "docker", "hidream-triton", "tritonserver") or \
                words[:2] in (["hidream-export", "serve"], ["hidream-export", "client"],
                              ["hidream-export", "triton-repo"]), line


def test_the_readme_python_examples_run(workdir):
    """The runtime example, then the LoRA one in the same namespace (it continues with `pipe`)."""
    (runtime,) = [b for b in _blocks("python") if "from hidream_export.runtime import Pipeline" in b]
    (lora,) = [b for b in _blocks("python") if "set_loras" in b]
    namespace: dict = {}
    with contextlib.chdir(workdir):
        exec(compile(runtime, str(README), "exec"), namespace)
        exec(compile(lora, str(README), "exec"), namespace)
    assert (workdir / "fox.png").is_file()
    assert [(r.file, r.scale) for r in namespace["pipe"].loras.records] == [("detail.safetensors", 1.0)]


def test_lint_takes_options_anywhere_and_help(capsys, tiny_export):
    folder, _ = tiny_export("plugin")
    model = str(folder / "transformer" / "model.onnx")
    with pytest.raises(SystemExit) as done:
        cli_main(["lint", "--help"])
    assert done.value.code == 0 and "--no-plugins" in capsys.readouterr().out
    assert cli_main(["lint", "--json", model]) == 0 and '"ok": true' in capsys.readouterr().out
    assert cli_main(["lint", model, "--no-info"]) == 0
