"""The GPU check's CPU-runnable parts: the plan it prints without a GPU, the measurement script on the tiny
preset, the FLOP count its TFLOP/s figures divide by, and the Polygraphy goldens it hands TensorRT. The GPU
itself is exercised only when a machine is lent (tools/gpu_check.sh there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from polygraphy.comparator import RunResults
from polygraphy.json import load_json
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hidream_export.model import HiDreamTransformer
from hidream_export.model.config import get_preset
from hidream_export.variants import TEXT_LENGTH, VAE_SCALE

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@pytest.mark.parametrize("preset,side,batch", [("tiny", 256, 1), ("tiny", 512, 2)])
def test_forward_flops_matches_torch_flop_counter(preset, side, batch):
    """forward_flops (what TFLOP/s figures divide by) against torch's own FLOP counter on a real forward.
    The `gather` lowering runs each token through its top-k experts only, as forward_flops counts; the math
    attention backend makes attention visible to the counter as bmm. The counter skips norms, activations
    and softmax, which forward_flops also leaves out: agreement within 0.2% (measured: 0.05% at most, also
    on the small preset)."""
    config = get_preset(preset)
    model = HiDreamTransformer(config, rope_dtype="float32").eval()
    model.set_moe_lowering("gather")
    lat = side // VAE_SCALE
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, config.in_channels, lat, lat, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, TEXT_LENGTH, config.t5_dim, generator=g),
            torch.randn(config.num_llama_layers, batch, TEXT_LENGTH, config.llama_dim, generator=g),
            torch.randn(batch, config.text_emb_dim, generator=g))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)
    counted = counter.get_total_flops()
    assert counted > 0
    assert abs(config.forward_flops(side, side, batch) / counted - 1) < 2e-3


def test_forward_flops_of_the_real_config():
    """77.8 TFLOP at 1024x1024, batch 1: 2 x ~2.6B active parameters per image token x 4,097 tokens, plus
    attention over 4,481 tokens; batch scales it linearly."""
    real = get_preset("real")
    assert real.forward_flops(1024, 1024) == pytest.approx(77.8e12, rel=2e-3)
    assert real.forward_flops(1024, 1024, 2) == 2 * real.forward_flops(1024, 1024)


def test_gpu_check_dry_run_without_gpu(tmp_path):
    """Without a GPU every step is SKIP with its reason (none FAIL), the exit status is 0, and nothing is
    written: the plan a lent machine would follow can be read here first."""
    work = tmp_path / "work"
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=300, env=_env(PYTHON=sys.executable, HIDREAM_GPU_CHECK_DIR=str(work)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("==> ")]
    names = " ".join(lines)
    for step in ("inputs", "gpu", "measure", "triton kernels", "tensorrt build", "polygraphy", "timing"):
        assert step in names, proc.stdout
    assert not any(ln.startswith("==> FAIL") for ln in lines), proc.stdout
    if not torch.cuda.is_available():
        assert "SKIP  gpu" in names and "SKIP  measure" in names
    assert not work.exists()

    bad = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True,
                         timeout=60, env=_env(PYTHON=sys.executable, HIDREAM_GPU_CHECK_DIR=str(work)))
    assert bad.returncode == 2 and "--bogus" in bad.stderr


def test_gpu_measure_forward_on_cpu(tmp_path):
    """The measurement script's forward part, as on the GPU but on the tiny preset on a CPU: every MoE
    lowering runs, agrees with the reference lowering (bf16: cosine >= 0.999), and the projection
    multiplies the fastest batch-1 step by 16 and 28 steps."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_measure.py"), "--device", "cpu", "--preset",
                           "tiny", "--sizes", "256", "--batches", "1", "--iters", "1", "--parts", "forward",
                           "projection", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_measure.json").read_text())
    rows = {r["lowering"]: r for r in report["forward"]}
    assert set(rows) == {"reference", "dense", "gather", "plugin"}
    for row in rows.values():
        assert row["seconds"] > 0 and row["cosine_vs_reference"] >= 0.999, row
        assert row["tflop_needed"] == pytest.approx(get_preset("tiny").forward_flops(256, 256) / 1e12)
    best = min(r["seconds"] for r in rows.values())
    steps = {p["variant"]: p for p in report["projection"]}
    assert steps["Fast"]["transformer_seconds"] == pytest.approx(16 * best)
    assert steps["Dev"]["transformer_seconds"] == pytest.approx(28 * best)
    assert "Full" not in steps  # CFG needs batch 2, which was not measured
    assert report["skipped"]["kernels"].startswith("not asked for")
    assert "| transformer forward (bf16) |" in (tmp_path / "gpu_measure.md").read_text()


def test_gpu_check_goldens_match_onnx_runtime(tiny_export, tiny_transformer_dir, tmp_path):
    """The Polygraphy inputs and PyTorch reference outputs that the GPU check hands TensorRT, checked here
    against an independent runner: ONNX Runtime on the exported graph reproduces them (fp32: 1e-4 of the
    output's scale)."""
    folder, _ = tiny_export("gather")
    gold = tmp_path / "gold"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "goldens", str(folder),
                           str(tiny_transformer_dir / "transformer"), str(gold), "--size", "256x256"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    feeds = load_json(str(gold / "trt_inputs.json"))
    refs = RunResults.load(str(gold / "trt_reference_outputs.json"))[0][1]
    assert len(feeds) == len(refs) == 1
    session = ort.InferenceSession(str(folder / "transformer" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["sample"], {k: np.asarray(v) for k, v in feeds[0].items()})[0]
    want = np.asarray(refs[0]["sample"])
    assert got.shape == want.shape and got.shape[-2:] == (32, 32)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert json.loads((gold / "scale.json").read_text())["dtype"] == "fp32"
