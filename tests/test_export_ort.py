"""The `ort` MoE lowering (one com.microsoft.MoE node per layer) and the onnxruntime export target.

Parity of the whole graph (every size and batch, routing not baked, streamed vs plain) runs with the
other lowerings in test_export.py and test_export_streaming.py; here: the node's contract, the weight
layout streamed into it, the target's fused ops, and the refusals.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load_file

from hidream_export.cli import main as cli_main
from hidream_export.compare.parity import compare_onnx, random_feed
from hidream_export.errors import BackendUnavailable, BuildPlanError, ExportError
from hidream_export.export.transformer import plan_transformer_export
from hidream_export.manifest import Manifest, TransformerComponent
from hidream_export.model import PRESETS
from hidream_export.model.checkpoint import load_transformer
from hidream_export.moe import ort_moe
from hidream_export.runtime.backends import get_backend
from hidream_export.runtime.ort_kernels import check_providers

INPUTS = ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds")
E, D, I = 4, 32, 256  # the tiny preset's experts: 4 of width 256 on a 32-wide model


def _graph(folder):
    return onnx.load(str(folder / "transformer" / "model.onnx"), load_external_data=False).graph


def _attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_moe_nodes_carry_every_attribute_explicitly(tiny_export):
    out, _ = tiny_export("ort")
    graph = _graph(out)
    nodes = [n for n in graph.node if n.op_type == "MoE"]
    assert len(nodes) == 4 and {n.domain for n in nodes} == {"com.microsoft"}
    for node in nodes:
        # router logits as router_probs (the op takes the softmax), no fc1 bias, fc2, nothing after it
        assert node.input[3] == "" and len(node.input) == 5
        assert node.input[2].endswith(".experts.fc1_experts_weights")
        assert node.input[4].endswith(".experts.fc2_experts_weights")
        assert _attributes(node) == {
            "k": 2, "normalize_routing_weights": 0, "activation_type": b"swiglu", "swiglu_fusion": 1,
            "activation_alpha": 1.0, "activation_beta": 0.0,
            # the largest finite float32: a clamp that never touches a finite activation
            "swiglu_limit": float(np.finfo(np.float32).max)}


def test_streamed_fc1_interleaves_w1_w3_rows_and_fc2_stacks_w2(tiny_export, tiny_transformer_dir):
    """The op's layout, checked byte for byte against the checkpoint with numpy (not the export's code)."""
    out, result = tiny_export("ort")
    ckpt = {}
    for shard in sorted((tiny_transformer_dir / "transformer").glob("*.safetensors")):
        ckpt.update(load_file(shard))
    inits = {i.name: i for i in _graph(out).initializer}
    layers = sorted(n.removesuffix(".fc1_experts_weights") for n in inits if n.endswith(".fc1_experts_weights"))
    assert len(layers) == 4
    for layer in layers:
        fc1 = onnx.numpy_helper.to_array(inits[f"{layer}.fc1_experts_weights"], str(out / "transformer"))
        fc2 = onnx.numpy_helper.to_array(inits[f"{layer}.fc2_experts_weights"], str(out / "transformer"))
        assert fc1.shape == (E, 2 * I, D) and fc2.shape == (E, D, I)
        for e in range(E):
            assert np.array_equal(fc1[e, 0::2], ckpt[f"{layer}.{e}.w1.weight"])
            assert np.array_equal(fc1[e, 1::2], ckpt[f"{layer}.{e}.w3.weight"])
            assert np.array_equal(fc2[e], ckpt[f"{layer}.{e}.w2.weight"])
        assert f"{layer}.0.w1.weight" not in inits  # no second copy of the experts
    mapped = result.component.initializer_map
    assert mapped[f"{layers[0]}.fc1_experts_weights"] == f"computed:{layers[0]}.fc1_experts_weights"
    # The dry run counts the weights the export writes: 48 expert tensors become 8 stacks.
    plan = plan_transformer_export(PRESETS["tiny"], "fp32", "ort", out)
    assert plan.initializers == len(mapped) == 157 - 48 + 8 + 4


def test_the_runtime_runs_an_ort_graph(tiny_export, tiny_transformer_dir):
    out, result = tiny_export("ort")
    entry = result.component
    session = get_backend("ort", providers=["CPUExecutionProvider"]).load(out / entry.path, entry)
    reference = load_transformer(tiny_transformer_dir, dtype=torch.float32, rope_dtype="float64")
    feed = random_feed(entry, 336, 128, 4, seed=3)
    with torch.no_grad():
        ref = reference(*(torch.from_numpy(feed[n]) for n in INPUTS)).numpy()
    got = session.run(feed)["sample"]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


# ---- the onnxruntime target -----------------------------------------------------------------------------

def test_onnxruntime_target_has_fused_ops_and_tensorrt_target_keeps_parseable_ones(tiny_export):
    fused, plain = _graph(tiny_export("ort")[0]), _graph(tiny_export("gather")[0])
    fused_ops = [n.op_type for n in fused.node]
    assert fused_ops.count("Attention") == 4 and fused_ops.count("RMSNormalization") == 12
    assert "Softmax" not in fused_ops and "ReduceMean" not in fused_ops  # nothing left unfused
    producers = {o: n for n in fused.node for o in n.output}
    for node in (n for n in fused.node if n.op_type == "Attention"):
        assert producers[node.input[3]].op_type == "Expand"  # the bias with its query axis spelled out
    plain_ops = {n.op_type for n in plain.node}
    assert not plain_ops & {"Attention", "RMSNormalization"} and "Softmax" in plain_ops
    manifest = Manifest.read(tiny_export("gather")[0]).transformer
    assert manifest.target == "tensorrt" and manifest.opset == 20


def test_target_contradictions_are_one_line_and_write_nothing(tiny_transformer_dir, tmp_path, capsys):
    cases = [(["--moe", "ort", "--target", "tensorrt"], "TensorRT cannot parse"),
             (["--target", "onnxruntime", "--opset", "20"], "--opset 20 is too old")]
    for i, (flags, needle) in enumerate(cases):
        capsys.readouterr()
        out = tmp_path / f"o{i}"
        assert cli_main(["export", str(tiny_transformer_dir), "--variant", "dev", "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    from hidream_export.build.pipeline import build_pipeline

    with pytest.raises(ExportError, match="--trt builds TensorRT engines"):
        build_pipeline(tiny_transformer_dir, "dev", tmp_path / "b", moe="ort", trt=True)
    assert not (tmp_path / "b").exists()


def test_tensorrt_build_plan_refuses_an_onnxruntime_transformer(tiny_export):
    from hidream_export.build.plan import make_build_plan

    out, _ = tiny_export("ort")
    with pytest.raises(BuildPlanError, match="transformer is an onnxruntime graph"):
        make_build_plan(Manifest.read(out), out, trt_version="10.15.0", compute_capability="9.0")


def test_manifests_without_a_target_read_as_tensorrt(tiny_export):
    out, _ = tiny_export("gather")
    data = json.loads((out / "manifest.json").read_text())
    del data["components"]["transformer"]["target"]
    entry = Manifest.from_dict(data).transformer
    assert isinstance(entry, TransformerComponent) and entry.target == "tensorrt"


# ---- fp16 / bf16 on the CPU provider ------------------------------------------------------------------

def _as_dtype(folder, dtype, tmp_path):
    """A copy of the export whose manifest says `dtype` (the refusal reads only the manifest)."""
    copy = shutil.copytree(folder, tmp_path / f"ort_{dtype}")
    manifest = Manifest.read(copy)
    manifest.transformer.dtype = dtype
    manifest.write(copy)
    return copy


def test_fp16_and_bf16_ort_graphs_are_refused_on_the_cpu_provider(tiny_export, tmp_path, capsys, monkeypatch):
    import onnxruntime

    out, _ = tiny_export("ort")
    fp16 = _as_dtype(out, "fp16", tmp_path)
    model = fp16 / "transformer" / "model.onnx"
    # Before 1.32 ONNX Runtime's CPU MoE kernel returned zeros in fp16: refused, and before anything is loaded
    # (the checkpoint given does not even exist).
    monkeypatch.setattr(onnxruntime, "__version__", "1.31.0")
    refusal = (r"fp16 --moe ort graph cannot run on ONNX Runtime's CPU provider.*zeros before 1\.32 "
               r"\(this is 1\.31\.0\).*CUDA provider.*--moe gather")
    with pytest.raises(BackendUnavailable, match=refusal):
        compare_onnx(tmp_path / "no_checkpoint", model)
    capsys.readouterr()
    assert cli_main(["compare", str(tmp_path / "no_checkpoint"), str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot run on ONNX Runtime's CPU provider" in err
    # The runtime's check, the same helper: CPU refused, the CUDA provider taking the node allowed.
    entry = Manifest.read(fp16).transformer
    with pytest.raises(BackendUnavailable, match="CPU provider"):
        check_providers(entry, ["CPUExecutionProvider"], str(model))
    check_providers(entry, ["CUDAExecutionProvider", "CPUExecutionProvider"], str(model))
    # 1.32 computes fp16 right (test_export_precision.py measures it): allowed. bf16 has no CPU kernel at all.
    check_providers(entry, None, version="1.32.0")
    bf16 = Manifest.read(_as_dtype(out, "bf16", tmp_path)).transformer
    with pytest.raises(BackendUnavailable, match="has no bf16 MoE kernel"):
        check_providers(bf16, ["CPUExecutionProvider"], version="1.32.0")
    # fp32 is never refused; the other lowerings in bf16 are, by the CPU provider's missing bf16 TopK, and pass
    # once a device provider takes the graph.
    check_providers(Manifest.read(out).transformer, None, version="1.23.0")
    gather = Manifest.read(tiny_export("gather")[0]).transformer
    gather.dtype = "bf16"
    with pytest.raises(BackendUnavailable, match="no bfloat16 kernel for TopK"):
        check_providers(gather, ["CPUExecutionProvider"], version="1.23.0")
    check_providers(gather, ["CUDAExecutionProvider"], version="1.23.0")


def test_name_fused_weights_refuses_a_graph_it_does_not_recognise():
    """The pass that gives fc1/fc2 their own initializers checks where the stacks come from."""
    import onnx_ir as ir

    ort_moe.register_onnx_schema()
    w = onnx.numpy_helper.from_array(np.zeros((E, 2 * I, D), np.float32), "some.other.weight")
    node = onnx.helper.make_node("MoE", ["x", "r", "some.other.weight", "", "some.other.weight"], ["y"],
                                 domain="com.microsoft", **ort_moe.node_attributes(2))
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, [5, D]),
                                                 onnx.helper.make_tensor_value_info("r", 1, [5, E])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [5, D])], [w])
    model = ir.serde.deserialize_model(onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 20), onnx.helper.make_opsetid("com.microsoft", 1)]))
    with pytest.raises(ExportError, match="not from the 4 experts' weights of one layer"):
        ort_moe.name_fused_weights(model, E)
