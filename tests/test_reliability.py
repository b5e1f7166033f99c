"""Hostile inputs and faults: every read stays inside its folder, user data is never destroyed, an export
resumes after a kill at any moment, and every expected failure is one line (exit 2) naming what is wrong.

Each test asserts the exit code, the one message line, that nothing was written where it should not be,
and (where it applies) that a later good run still works.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from hidream_export.cli import main as cli_main
from hidream_export.files import LOCK_NAME, file_record, sha256_file
from hidream_export.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv, code: int = 2) -> str:
    capsys.readouterr()
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _rewrite_manifest(folder: Path, change) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))


@pytest.fixture
def engine_copy(built, tmp_path):
    """A private copy of the session's Full engine folder (tests change it)."""
    dst = tmp_path / "engines" / "full"
    shutil.copytree(built.folder("full"), dst)
    return dst


# ---- reads stay inside the engine folder ---------------------------------------------------------------

@pytest.mark.parametrize("case", ["dotdot_file", "absolute_path", "unlisted_path", "dev_zero", "fifo", "link_out"])
def test_manifest_paths_stay_inside_the_folder(engine_copy, tmp_path, capsys, case):
    outside = tmp_path / "outside.onnx"
    shutil.copy(engine_copy / "vae_decoder" / "model.onnx", outside)
    vae = engine_copy / "vae_decoder" / "model.onnx"
    if case == "dotdot_file":
        _rewrite_manifest(engine_copy, lambda d: d["components"]["vae_decoder"]["files"].update(
            {"../../outside.onnx": file_record(outside)}))
        needle = "leaves the folder"
    elif case == "absolute_path":
        _rewrite_manifest(engine_copy, lambda d: d["components"]["vae_decoder"].update(path=str(outside)))
        needle = "do not list"
    elif case == "unlisted_path":
        shutil.copy(outside, engine_copy / "vae_decoder" / "other.onnx")
        _rewrite_manifest(engine_copy, lambda d: d["components"]["vae_decoder"].update(path="vae_decoder/other.onnx"))
        needle = "do not list"
    elif case == "dev_zero":
        _rewrite_manifest(engine_copy, lambda d: d["components"]["vae_decoder"]["files"].update(
            {"/dev/zero": {"sha256": "0" * 64, "bytes": 1}}))
        needle = "leaves the folder"
    elif case == "fifo":
        vae.unlink()
        os.mkfifo(vae)
        needle = "not a regular file"
    else:
        vae.unlink()
        vae.symlink_to(outside)
        needle = "leads out of"
    out = tmp_path / "img.png"
    err = one_line_error(capsys, ["generate", str(engine_copy), "--prompt", "a", "--seed", "0", "-o", str(out)])
    assert needle in err and not out.exists()


def test_generate_never_writes_through_a_planted_link(built, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "cat.png"
    out.symlink_to(victim)
    # the temporary names an older writer used, planted as links too
    for name in (".cat.png.tmp.png", ".cat.png.tmp"):
        (tmp_path / name).symlink_to(victim)
    assert cli_main(["generate", str(built.folder("full")), "--prompt", "a", "--seed", "0", "--steps", "1",
                     "--quiet", "-o", str(out)]) == 0
    assert victim.read_text() == "keep me"
    assert out.is_file() and not out.is_symlink() and out.read_bytes()[:4] == b"\x89PNG"


def test_output_paths_are_checked_before_any_model_runs(built, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = one_line_error(capsys, ["generate", str(built.folder("full")), "--prompt", "a", "-o",
                                  str(blocker / "img.png")])
    assert "is not a folder" in err and str(blocker) in err
    err = one_line_error(capsys, ["generate", str(built.folder("full")), "--prompt", "a", "-o", str(tmp_path / "i.png"),
                                  "--json", str(blocker / "r.json")])
    assert "--json" in err


# ---- never destroy user data ------------------------------------------------------------------------------

def test_out_may_not_be_the_checkpoint_or_a_foreign_folder(tiny_transformer_dir, tmp_path, capsys):
    ckpt = shutil.copytree(tiny_transformer_dir, tmp_path / "ckpt")
    before = _tree(ckpt)
    for out in (ckpt, ckpt / "engines", tmp_path):
        err = one_line_error(capsys, ["export", str(ckpt), "--variant", "full", "--out", str(out), "--force"])
        assert "overlaps the input" in err
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"jpeg")
    err = one_line_error(capsys, ["export", str(ckpt), "--variant", "full", "--out", str(foreign), "--force"])
    assert "not empty and holds no manifest.json" in err and "holiday.jpg" in err
    assert _tree(ckpt) == before and (foreign / "holiday.jpg").read_bytes() == b"jpeg"
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


def test_demo_never_deletes_what_it_did_not_write(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "checkpoints" / "tiny-fast"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["demo"])
    assert "is not empty" in err and (mine / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "engines").exists()


def test_a_transformer_link_does_not_wedge_the_folder(tiny_transformer_dir, tiny_export, tmp_path, capsys):
    out = shutil.copytree(tiny_export("dense", "dev")[0], tmp_path / "out")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    shutil.rmtree(out / "transformer")
    (out / "transformer").symlink_to(elsewhere, target_is_directory=True)
    stale = out / ".transformer.partial-0123456789abcdef"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"\0" * 1024)
    assert cli_main(["export", str(tiny_transformer_dir), "--variant", "dev", "--moe", "dense", "--out", str(out),
                     "--force", "--quiet"]) == 0
    assert (elsewhere / "keep.txt").read_text() == "keep"  # the link was replaced, not followed
    assert (out / "transformer").is_dir() and not (out / "transformer").is_symlink()
    assert not stale.exists()  # --force removes partial exports
    Manifest.read(out).verify(out, ["transformer"])


def test_two_runs_on_one_out_folder(tiny_transformer_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hidream_export.cli", "export", str(tiny_transformer_dir), "--variant", "dev",
           "--moe", "dense", "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK_NAME).exists() or not (out / LOCK_NAME).read_text().strip():
            assert time.monotonic() < deadline and first.poll() is None, "the first export never took the lock"
            time.sleep(0.05)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().count("\n") == 0 and f"(pid {first.pid})" in second.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    Manifest.read(out).verify(out, ["transformer"])


# ---- wrong results are refused ----------------------------------------------------------------------------

def test_integer_tensors_are_refused(tiny_transformer_dir, tmp_path, capsys):
    ckpt = shutil.copytree(tiny_transformer_dir, tmp_path / "ckpt")
    shard = sorted((ckpt / "transformer").glob("*.safetensors"))[0]
    state = load_file(shard)
    key = sorted(state)[0]
    state[key] = state[key].astype("int8")
    save_file(state, shard)
    err = one_line_error(capsys, ["export", str(ckpt), "--variant", "full", "--out", str(tmp_path / "out")])
    assert f"tensor '{key}' is I8" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [10_000_000, 2.0, True])
def test_config_is_checked_before_a_model_is_built(tiny_transformer_dir, tmp_path, capsys, value):
    ckpt = shutil.copytree(tiny_transformer_dir, tmp_path / "ckpt")
    config = ckpt / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": value}))
    t0 = time.monotonic()
    err = one_line_error(capsys, ["info", str(ckpt)])
    assert "num_layers must be an integer in 0..1024" in err and time.monotonic() - t0 < 5


def test_guidance_on_a_distilled_variant_needs_the_flag(built, tmp_path, capsys):
    dev = built.folder("dev")
    err = one_line_error(capsys, ["generate", str(dev), "--prompt", "a", "--guidance", "4", "-o",
                                  str(tmp_path / "a.png")])
    assert "guidance-distilled" in err and "--allow-cfg" in err and not (tmp_path / "a.png").exists()
    capsys.readouterr()
    assert cli_main(["generate", str(dev), "--prompt", "a", "--guidance", "4", "--allow-cfg", "--steps", "1",
                     "--seed", "0", "--quiet", "-o", str(tmp_path / "b.png")]) == 0
    err = capsys.readouterr().err
    assert "note: CFG with guidance 4" in err and "seed 0" in err


# ---- one line for every expected failure ------------------------------------------------------------------

def test_damaged_folders_and_inputs_give_one_line(engine_copy, tiny_transformer_dir, tmp_path, capsys, monkeypatch):
    # a corrupt graph whose hash matches the manifest (re-recorded after the damage)
    vae = engine_copy / "vae_decoder" / "model.onnx"
    vae.write_bytes(b"not a protobuf" * 100)
    _rewrite_manifest(engine_copy, lambda d: d["components"]["vae_decoder"]["files"].update(
        {"vae_decoder/model.onnx": file_record(vae)}))
    err = one_line_error(capsys, ["generate", str(engine_copy), "--prompt", "a", "-o", str(tmp_path / "a.png")])
    assert "onnxruntime cannot load it" in err and "vae_decoder/model.onnx" in err
    # a malformed manifest
    _rewrite_manifest(engine_copy, lambda d: d["components"]["transformer"].pop("files"))
    err = one_line_error(capsys, ["generate", str(engine_copy), "--prompt", "a", "-o", str(tmp_path / "a.png")])
    assert "malformed" in err and "'transformer'" in err
    # a malformed shard index
    ckpt = shutil.copytree(tiny_transformer_dir, tmp_path / "ckpt")
    (ckpt / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": []}')
    err = one_line_error(capsys, ["info", str(ckpt)])
    assert "weight_map" in err
    # an opset the exporter does not write
    err = one_line_error(capsys, ["export", str(tiny_transformer_dir), "--variant", "dev", "--opset", "5",
                                  "--out", str(tmp_path / "o")])
    assert "--opset 5" in err
    # Ctrl-C
    from hidream_export.runtime import generate

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate, "generate_to_file", interrupted)
    err = one_line_error(capsys, ["generate", str(engine_copy), "--prompt", "a", "-o", str(tmp_path / "a.png")], 130)
    assert "interrupted" in err


def test_a_broken_encoder_fails_before_the_transformer_export(tiny_models, tmp_path, capsys):
    model = shutil.copytree(tiny_models("full"), tmp_path / "model", symlinks=True)
    (model / "text_encoder_3" / "config.json").write_text("{not json")
    out = tmp_path / "engines" / "full"
    err = one_line_error(capsys, ["build", str(model), "--variant", "full", "--out", str(out)])
    assert "text_encoder_3" in err and not (out / "transformer").exists()


# ---- kill -9 at ten moments of an export, then rerun --------------------------------------------------------

KILLER = textwrap.dedent("""
    # Runs `hidream-export export ...` and SIGKILLs itself at the N-th call of one function.
    import importlib, os, signal, sys
    module, attr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    target = importlib.import_module(module)
    original = getattr(target, attr)
    calls = [0]
    def killing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            if attr == "infer_shapes_path":  # die half-way through writing the inferred graph
                with open(args[1], "wb") as fh:
                    fh.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(target, attr, killing)
    from hidream_export.cli import main
    sys.exit(main(sys.argv[4:]))
""")

# (module, function, call number): in the order an export reaches them. Each run resumes from what the runs
# before it left, so the counts are per run.
MOMENTS = [
    ("hidream_export.export.blockwise", "_trace_part", 2),          # tracing the second part
    ("os", "fsync", 1),                                             # graph written, not yet renamed
    ("hidream_export.export.streaming", "write_journal", 1),        # graph renamed, journal not written
    ("hidream_export.model.checkpoint", "read_tensor_chunks", 1),   # first weight
    ("hidream_export.model.checkpoint", "read_tensor_chunks", 40),  # after the first journal flush
    ("hidream_export.model.checkpoint", "read_tensor_chunks", 60),
    ("hidream_export.model.checkpoint", "read_tensor_chunks", 50),
    ("onnx.shape_inference", "infer_shapes_path", 1),              # weights done, shape inference half-written
    ("hidream_export.files", "replace_file", 1),                    # inferred graph not yet renamed
    ("hidream_export.manifest", "Manifest.write", 1),               # transformer/ in place, no manifest yet
]


@pytest.mark.slow
def test_kill_at_ten_moments_then_rerun(tiny_transformer_dir, tiny_export, tmp_path):
    """Each run is killed at its moment (PYTHONHASHSEED differs per run), the next one resumes; the final
    files are the uninterrupted export's, byte for byte, so ONNX Runtime's outputs are too."""
    reference = tiny_export("dense", "dev")[0] / "transformer"
    out = tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    argv = ["export", str(tiny_transformer_dir), "--variant", "dev", "--moe", "dense", "--out", str(out), "--quiet"]
    for i, (module, attr, n) in enumerate(MOMENTS):
        if "." in attr:  # a method: patch it on its class
            cls, attr = attr.split(".")
            module = f"{module}"
            patch = (module, cls, attr)
        else:
            patch = None
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": str(100 + i)}
        if patch is None:
            run = subprocess.run([sys.executable, str(script), module, attr, str(n), *argv], env=env,
                                 capture_output=True, text=True, timeout=300)
        else:
            code = KILLER.replace("target = importlib.import_module(module)",
                                  f"target = getattr(importlib.import_module(module), {patch[1]!r})")
            script.write_text(code)
            run = subprocess.run([sys.executable, str(script), patch[0], patch[2], str(n), *argv], env=env,
                                 capture_output=True, text=True, timeout=300)
        assert run.returncode == -signal.SIGKILL, (i, module, attr, run.returncode, run.stderr[-2000:])
    final = subprocess.run([sys.executable, "-m", "hidream_export.cli", *argv], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    for name in ("model.onnx", "model.onnx.data"):
        assert sha256_file(out / "transformer" / name) == sha256_file(reference / name), name
    Manifest.read(out).verify(out, ["transformer"])
    assert not [p for p in out.iterdir() if p.name.startswith(".transformer.partial-")]
