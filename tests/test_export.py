"""ONNX export of the transformer, checked with ONNX Runtime and Polygraphy against the PyTorch reference.

Tolerance (fp32): max |onnx - torch| <= 1e-4 * max |torch|. The exported graph differs from the reference
lowering only in summation order, ~1e-6 measured; 1e-4 is the issue's bound.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from hidream_export.cli import main as cli_main
from hidream_export.compare.parity import compare_onnx, random_feed
from hidream_export.lint import lint_onnx
from hidream_export.export.transformer import export_transformer
from hidream_export.files import LOCK_NAME, sha256_file
from hidream_export.manifest import FORMAT_VERSION
from hidream_export.model.checkpoint import load_transformer
from hidream_export.testing.checkpoints import write_transformer

INPUTS = ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds")


@pytest.fixture(params=["dense", "gather", "plugin", "ort"])
def exported(request, tiny_export):
    out, result = tiny_export(request.param)
    return request.param, out, result.component


def test_one_file_serves_every_size_and_batch(exported, tiny_transformer_dir):
    moe, out, entry = exported
    model = out / "transformer" / "model.onnx"
    # square, smallest, largest, two non-square (padding path), at 1, 2 and 4 images (CFG batch 2, 4, 8)
    sizes = ["256x256", "128x128", "336x336", "336x128", "128x304"]
    for batch in (2, 4, 8):
        report = compare_onnx(tiny_transformer_dir, model, sizes=sizes if batch == 2 else sizes[:2],
                              batch=batch, rtol=1e-4)
        assert report.passed, report.format()
        assert max(c.max_rel_err for c in report.cases) < 1e-4


def test_graph_contract(exported):
    moe, out, entry = exported
    proto = onnx.load(out / "transformer" / "model.onnx", load_external_data=False)
    assert [i.name for i in proto.graph.input] == list(INPUTS)
    assert [o.name for o in proto.graph.output] == ["sample"]
    # Weights are always external; only small folded constants (shape tables) may stay inline.
    weights = set(entry.initializer_map)
    assert weights and all(init.data_location == onnx.TensorProto.EXTERNAL
                           for init in proto.graph.initializer if init.name in weights)
    assert all(len(init.raw_data) < 64 * 1024 for init in proto.graph.initializer
               if init.data_location != onnx.TensorProto.EXTERNAL)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 16 and isinstance(dims[2], str) and isinstance(dims[3], str)
    t5 = [d.dim_value for d in proto.graph.input[2].type.tensor_type.shape.dim]
    assert t5[1:] == [128, 32]  # text length fixed at 128
    assert proto.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64  # Full: UniPC int timesteps
    ops = {n.op_type for n in proto.graph.node}
    if moe == "ort":  # the contrib MoE node routes itself (softmax + top-k over the router logits)
        assert "TopK" not in ops and [n.domain for n in proto.graph.node if n.op_type == "MoE"] == ["com.microsoft"] * 4
    else:
        assert "TopK" in ops and "Softmax" in ops  # routing stays in standard ops
    if moe == "plugin":
        moe_nodes = [n for n in proto.graph.node if n.op_type == "HiDreamMoE"]
        assert len(moe_nodes) == 4 and all(n.domain == "hidream" for n in moe_nodes)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe_nodes[0].attribute}
        assert attrs == {"plugin_namespace": b"hidream", "plugin_version": b"1", "top_k": 2, "num_experts": 4}
        assert [f.name for f in proto.functions] == ["HiDreamMoE"]


def test_manifest_records_the_export(exported, tiny_transformer_dir):
    moe, out, entry = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["variant"]["name"] == "full" and manifest["variant"]["cfg_batch_factor"] == 2
    t = manifest["components"]["transformer"]
    target, opset = ("onnxruntime", 23) if moe == "ort" else ("tensorrt", 20)
    assert t["moe_lowering"] == moe and t["target"] == target and t["dtype"] == "fp32" and t["opset"] == opset
    assert t["axes"]["batch"] == [2, 8] and t["batch_multiple"] == 2
    assert t["size_range"] == {"min": [128, 128], "max": [336, 336], "opt": [256, 256]}
    assert {"torch", "onnx"} <= set(t["versions"])
    assert len(t["source"]["checkpoint_sha256"]) == 64
    for rel, info in t["files"].items():
        assert sha256_file(out / rel) == info["sha256"]
    # no temp folders left (the lock file stays: it is how a second run learns who writes)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]


def test_lint(exported, capsys):
    moe, out, entry = exported
    if moe == "ort":  # not a TensorRT graph: one line, exit code 3, no op-by-op report
        capsys.readouterr()
        assert cli_main(["lint", str(out / "transformer" / "model.onnx")]) == 3
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is an ONNX Runtime graph, not a TensorRT graph" in err, err
        assert "4 com.microsoft node(s) (MoE" in err
        return
    report = lint_onnx(out / "transformer" / "model.onnx")
    if moe in ("dense", "plugin"):
        assert report.ok and not report.warnings, report.format()
    else:  # gather: data-dependent shapes are warnings, but nothing TensorRT rejects
        assert report.ok, report.format()
        scatters = [n for n in onnx.load(out / "transformer" / "model.onnx", load_external_data=False).graph.node
                    if n.op_type.startswith("Scatter")]
        assert scatters and all(not n.attribute for n in scatters)  # no reduction attribute


def test_polygraphy_cli_rechecks_the_export(tiny_export, tiny_transformer_dir, tmp_path):
    """One lowering (gather, the default) is enough for the Polygraphy round trip."""
    out, _ = tiny_export("gather")
    model = out / "transformer" / "model.onnx"
    report = compare_onnx(tiny_transformer_dir, model, sizes=["256x256", "336x128"], save_dir=tmp_path)
    assert report.passed
    cmd = report.polygraphy_command().split()
    assert cmd[:3] == ["polygraphy", "run", str(model)]
    # The console script next to this interpreter (the venv need not be on PATH), else the one on PATH.
    beside = Path(sys.executable).with_name("polygraphy")
    polygraphy = [str(beside)] if beside.is_file() else [shutil.which("polygraphy") or "polygraphy"]
    run = subprocess.run(polygraphy + cmd[1:], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASSED" in run.stdout + run.stderr
    # The same command must be able to fail: perturb the saved reference outputs.
    from polygraphy.comparator import RunResults

    results = RunResults.load(report.outputs_json)
    for _, iterations in results:
        for it in iterations:
            it["sample"] = it["sample"] + 1.0
    results.save(report.outputs_json)
    run = subprocess.run(polygraphy + cmd[1:], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0


def test_dev_variant_feeds_batch_one_and_float_timesteps(tiny_transformer_dir, tiny_export):
    out, result = tiny_export("dense", "dev")
    entry = result.component
    assert entry.axes["batch"] == (1, 4) and entry.batch_multiple == 1
    assert entry.input("timesteps").dtype == "float32"
    for batch in (1, 3):
        report = compare_onnx(tiny_transformer_dir, out / "transformer" / "model.onnx",
                              sizes=["256x256", "336x128"], batch=batch)
        assert report.passed, report.format()


# ---- routing is computed, not baked -----------------------------------------------------------------

def _degenerate_routing_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a tiny checkpoint and make single block 0's MoE see the same vector for every token:
    scale_mlp = -1 (so LN(x)*(1+scale) = 0) and shift_mlp depends on the conditioning only. Then its
    two selected experts receive ALL tokens and the other two receive NONE, and which two depends on
    the pooled embedding, i.e. on the input, not on the weights."""
    shutil.copytree(src, dst)
    folder = dst / "transformer"
    D = 32
    for shard in folder.glob("*.safetensors"):
        state = load_file(shard)
        key_w = "single_stream_blocks.0.block.adaLN_modulation.1.weight"
        if key_w in state:
            w, b = state[key_w], state[key_w.replace("weight", "bias")]
            w[4 * D:5 * D] = 0.0
            b[4 * D:5 * D] = -1.0
            w[3 * D:4 * D] *= 20.0  # a strong, input-dependent shift drives the routing
            state[key_w.replace("weight", "bias")] = b
            save_file(state, shard, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("moe", ["gather", "ort"])
def test_routing_of_the_sample_input_is_not_baked(tiny_transformer_dir, tmp_path, moe):
    ckpt = _degenerate_routing_checkpoint(tiny_transformer_dir, tmp_path / "ckpt")
    out = tmp_path / "export"
    entry = export_transformer(ckpt, "full", out, moe=moe).component
    model = load_transformer(ckpt, dtype=torch.float32)
    seen = []
    gate = model.single_stream_blocks[0].block.ff_i.gate
    gate.register_forward_hook(lambda m, i, o: seen.append(o[0].flatten().bincount(minlength=4)))
    session = ort.InferenceSession(str(out / "transformer" / "model.onnx"))
    expert_sets = set()
    for seed in range(12):
        feed = random_feed(entry, 256, 256, 2, seed)
        # One conditioning for the whole batch, so every token of every sample sees the same MoE input.
        feed["pooled_embeds"][:] = 3.0 * feed["pooled_embeds"][0]
        feed["timesteps"][:] = feed["timesteps"][0]
        seen.clear()
        with torch.no_grad():
            ref = model(*(torch.from_numpy(feed[n]) for n in INPUTS)).numpy()
        counts = seen[0]
        tokens = counts.sum().item() // 2
        assert sorted(counts.tolist())[:2] == [0, 0] and max(counts.tolist()) == tokens  # all / none
        got = session.run(["sample"], feed)[0]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), f"seed {seed}"
        expert_sets.add(tuple(int(e) for e in (counts > 0).nonzero().flatten()))
    # Several different all-or-nothing routings through one exported graph: at most one is the traced one.
    assert len(expert_sets) >= 2, expert_sets


# ---- bad input -----------------------------------------------------------------------------------

def _cli_error(capsys, argv):
    capsys.readouterr()  # only what this command prints
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_give_one_line_and_leave_nothing(tiny_transformer_dir, tmp_path, capsys):
    ckpt = str(tiny_transformer_dir)
    # a checkpoint whose scheduler says it is another variant
    folder = shutil.copytree(tiny_transformer_dir, tmp_path / "dev_model")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchLCMScheduler", "shift": 6.0}))
    err = _cli_error(capsys, ["export", str(folder), "--variant", "fast", "--out", str(tmp_path / "o1")])
    assert "FlowMatchLCMScheduler with shift 6.0" in err and "--variant fast" in err
    # a size range the model cannot take
    err = _cli_error(capsys, ["export", ckpt, "--variant", "dev", "--out", str(tmp_path / "o2"),
                              "--min-size", "400x400"])
    assert "min <= opt <= max" in err
    # a checkpoint that fails to load
    broken = shutil.copytree(tiny_transformer_dir, tmp_path / "broken")
    shard = sorted((broken / "transformer").glob("*00001-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    err = _cli_error(capsys, ["export", str(broken), "--variant", "dev", "--out", str(tmp_path / "o3")])
    assert str(shard) in err and "truncated" in err
    # an unwritable output directory (a path below a regular file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _cli_error(capsys, ["export", ckpt, "--variant", "dev", "--out", str(blocker / "sub")])
    assert "not writable" in err
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()  # refused before anything was written


def test_out_dir_holding_another_checkpoint_is_refused(tiny_export, tiny_transformer_dir, tmp_path, capsys):
    out = shutil.copytree(tiny_export("dense", "dev")[0], tmp_path / "out")
    other = tmp_path / "other"
    write_transformer(other / "transformer", "tiny", seed=7)
    before = sha256_file(out / "transformer" / "model.onnx.data")
    err = _cli_error(capsys, ["export", str(other), "--variant", "dev", "--moe", "dense", "--out", str(out)])
    assert "holds an export of another checkpoint" in err
    assert sha256_file(out / "transformer" / "model.onnx.data") == before
    # the same checkpoint with other settings is refused the same way (and the dry run says so too)
    for extra in ([], ["--dry-run"]):
        err = _cli_error(capsys, ["export", str(tiny_transformer_dir), "--variant", "dev", "--moe", "gather",
                                  "--out", str(out), *extra])
        assert "exported with other settings (moe 'dense' -> 'gather')" in err and "--force" in err
    # compare refuses sizes outside the exported range, naming it
    err = _cli_error(capsys, ["compare", str(other), str(out / "transformer" / "model.onnx"), "--sizes", "512x512"])
    assert "outside the exported range 128x128 .. 336x336" in err
