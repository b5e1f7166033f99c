"""Quantized exports: the arithmetic against ONNX Runtime's and ModelOpt's own quantizers, the graph against
ONNX Runtime, the exported transformer against the fp32 PyTorch reference (cosine, routing agreement), bad
input, the settings key, the manifest and the TensorRT plan. The acceptance bounds on the `small` preset
and the FP8 calibration run end to end are @slow."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from modelopt.torch.quantization.qtensor import FP8QTensor
from onnxruntime.capi._pybind_state import quantize_matmul_8bits, quantize_qdq_matmul_4bits

from hidream_export.cli import main as cli_main
from hidream_export.compare.parity import compare_onnx
from hidream_export.errors import ExportError
from hidream_export.export import streaming
from hidream_export.export.spec import ExportSpec
from hidream_export.export.transformer import export_transformer
from hidream_export.manifest import Manifest
from hidream_export.model.checkpoint import expected_shapes
from hidream_export.model.config import PRESETS
from hidream_export.quant import weights as qweights
from hidream_export.quant.graph import quantize_graph
from hidream_export.quant.scheme import CalibrationTable, QuantScheme, module_of
from hidream_export.quant.weights import QuantFetch, quantize_weight
from hidream_export.signature import batch_range
from hidream_export.testing.checkpoints import write_transformer

# `tiny` with a Llama width of 32: every quantized weight's input dimension is a multiple of the 32 block
# (the plain tiny preset's 24-wide Llama projections are the bad-input case below).
TINY_Q = dataclasses.replace(PRESETS["tiny"], caption_channels=(32, 32))


def _pieces(array: np.ndarray, size: int = 1000):
    data = array.astype(np.float32).tobytes()
    return [data[i:i + size] for i in range(0, len(data), size)]


# ---- the arithmetic ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", [QuantScheme("int4", 32), QuantScheme("int4", 64), QuantScheme("int8", 32),
                                    QuantScheme("int8", 128), QuantScheme("fp8")])
def test_streamed_quantization_is_the_libraries_whole_tensor_quantization(scheme, monkeypatch):
    """Row chunks and odd byte pieces give exactly the codes and scales ONNX Runtime's kernels (int) or
    ModelOpt's FP8 quantizer produce for the whole tensor at once."""
    monkeypatch.setattr(qweights, "CHUNK_BYTES", 6 * 256 * 4)  # 6 rows per chunk: 11 chunks, the last one short
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 256)) * rng.uniform(0.1, 3, (64, 1))).astype(np.float32)  # [out, in]
    got = quantize_weight(w.shape, _pieces(w), scheme, "w")
    columns = np.ascontiguousarray(w.T)
    if scheme.scheme == "int4":
        packed = np.zeros(w.size // 2, np.uint8)
        scales = np.zeros((256 // scheme.block_size, 64), np.float32)
        quantize_qdq_matmul_4bits(packed, columns, scales, np.zeros(64 * 8, np.uint8), scheme.block_size, 64, 256, True)
        np.testing.assert_array_equal(got.codes.reshape(-1), packed)
    elif scheme.scheme == "int8":
        packed = np.zeros((64, 256 // scheme.block_size, scheme.block_size), np.uint8)
        scales = np.zeros((64, 256 // scheme.block_size), np.float32)
        quantize_matmul_8bits(packed, columns, scales, np.zeros_like(scales, np.uint8), scheme.block_size, 64, 256, True)
        np.testing.assert_array_equal(got.codes.T.astype(np.int16) + 128, packed.reshape(64, 256))
        scales = scales.T
    else:
        q, scales = FP8QTensor.quantize(torch.from_numpy(w), axis=0)
        np.testing.assert_array_equal(got.codes.T, q._quantized_data.view(torch.uint8).numpy())
        scales = scales.reshape(-1).numpy()
    np.testing.assert_array_equal(got.scales, scales)


def _linear_model(scheme: QuantScheme, w1: np.ndarray, w2: np.ndarray, bias: np.ndarray, tmp_path):
    """x [M, K] -> MatMul(x, Transpose(W1)) and Gemm(x, W2, b, transB=1), as the exporter writes linear
    layers, quantized by quantize_graph and streamed by QuantFetch (no tracing)."""
    m, k = 8, w1.shape[1]
    x = ir.Value(name="x", shape=ir.Shape([m, k]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    values = {}
    for name, array in (("a.weight", w1), ("b.weight", w2), ("b.bias", bias)):
        values[name] = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                                const_value=ir.tensor(array, name=name))
        graph.register_initializer(values[name])
    t = ir.node("Transpose", [values["a.weight"]], {"perm": [1, 0]})
    y1 = ir.node("MatMul", [x, t.outputs[0]])
    y2 = ir.node("Gemm", [x, values["b.weight"], values["b.bias"]], {"transB": 1})
    graph.extend([t, y1, y2])
    for value, name, n in ((y1.outputs[0], "y1", w1.shape[0]), (y2.outputs[0], "y2", w2.shape[0])):
        value.name, value.type, value.shape = name, ir.TensorType(ir.DataType.FLOAT), ir.Shape([m, n])
    graph.outputs.extend([y1.outputs[0], y2.outputs[0]])
    model = ir.Model(graph, ir_version=10)
    floats = {"a.weight": w1, "b.weight": w2, "b.bias": bias}
    for value in graph.initializers.values():
        value.const_value = None
    weights, count = quantize_graph(model, list(floats), scheme, lambda n: n.endswith(".weight"))
    assert count == 2
    slots = streaming.layout(model, weights, "model.onnx.data")
    streaming.save_graph(model, tmp_path / "model.onnx")
    fetch = QuantFetch(scheme, "fp32", lambda n: (floats[n].shape, _pieces(floats[n])), lambda mod: f"{mod}.weight")

    def source(name):
        found = fetch(name)
        return streaming.TensorPieces(found[0], [found[1]]) if found else torch.from_numpy(floats[name])
    streaming.stream_weights(tmp_path / "model.onnx.data", slots, source, tmp_path / "progress.json")
    return tmp_path / "model.onnx", rng_input(m, k)


def rng_input(m, k):
    return np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)


@pytest.mark.parametrize("scheme,min_cosine", [(QuantScheme("int8", 32, None, 1), 0.9999),
                                                (QuantScheme("int4", 32, None, 1), 0.99)])
def test_quantized_linear_layers_run_in_onnxruntime_as_matmulnbits(scheme, min_cosine, tmp_path):
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((48, 64)) / 8).astype(np.float32), (rng.standard_normal((32, 64)) / 8).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    path, x = _linear_model(scheme, w1, w2, bias, tmp_path)
    onnx.checker.check_model(str(path))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    y1, y2 = ort.InferenceSession(str(path), opts).run(None, {"x": x})
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    assert fused.count("MatMulNBits") == 2 and "DequantizeLinear" not in fused, fused
    for got, ref in ((y1, x @ w1.T), (y2, x @ w2.T + bias)):
        cosine = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
        assert cosine >= min_cosine


# ---- a tiny transformer, exported once ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory):
    """(checkpoint, folder) of a tiny int8 (block 32) streaming export."""
    root = tmp_path_factory.mktemp("tiny_q")
    write_transformer(root / "ckpt" / "transformer", TINY_Q, seed=0)
    export_transformer(root / "ckpt", "dev", root / "int8", quant="int8", quant_block=32)
    return root / "ckpt", root / "int8"


def test_bf16_export_stores_the_fp32_exports_codes_and_its_scales_in_bf16(tiny_q, tmp_path):
    """A bf16 export (the size baseline's dtype) quantizes the same: identical codes, and the scales are
    the fp32 export's rounded to bfloat16 by ml_dtypes (the oracle for the cast)."""
    import ml_dtypes
    from onnx import numpy_helper

    ckpt, folder = tiny_q
    export_transformer(ckpt, "dev", tmp_path / "bf16", dtype="bf16", quant="int8", quant_block=32)

    def tensors(root):
        model = onnx.load(root / "transformer" / "model.onnx")  # external data read from beside the file
        return {t.name: t for t in model.graph.initializer if t.name.endswith((".qweight", ".weight_scale"))}

    want, got = tensors(folder), tensors(tmp_path / "bf16")
    assert want and set(got) == set(want)
    for name, tensor in got.items():
        if name.endswith(".qweight"):
            assert np.array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(want[name])), name
        else:
            assert tensor.data_type == onnx.TensorProto.BFLOAT16, name
            bits = np.frombuffer(tensor.raw_data, np.uint16)
            expected = numpy_helper.to_array(want[name]).astype(ml_dtypes.bfloat16).view(np.uint16).reshape(-1)
            assert np.array_equal(bits, expected), name


def test_int8_export_meets_its_bounds_against_the_fp32_reference(tiny_q):
    ckpt, folder = tiny_q
    report = compare_onnx(ckpt, folder / "transformer" / "model.onnx", sizes=["256x256"], timesteps="recipe")
    assert report.tolerance["min_cosine"] == 0.9995 and report.tolerance["min_routing"] == 0.99
    assert report.passed, report.format()
    assert all(c.routing_agreement is not None for c in report.cases)
    entry = Manifest.read(folder).transformer
    q = entry.quant
    assert (q.scheme, q.block_size, q.ort_accuracy_level) == ("int8", 32, 1)
    n_linear = sum(1 for k, s in expected_shapes(TINY_Q).items() if len(s) == 2 and k.endswith(".weight")
                   and ".gate." not in k and not k.startswith(("t_embedder", "p_embedder", "x_embedder", "final_layer")))
    assert q.quantized_weights == n_linear and set(q.kept) == {"router", "embedders", "final_layer"}
    assert entry.settings_key and "quant" in entry.extra["settings"]


def test_a_wrongly_scaled_weight_fails_the_bound(tiny_q, tmp_path):
    """Guard: one attention output projection's int8 scales doubled in the data file -> compare fails."""
    ckpt, folder = tiny_q
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    path = bad / "transformer" / "model.onnx"
    name = "double_stream_blocks.1.block.attn1.to_out.weight_scale"
    init = next(i for i in onnx.load(str(path), load_external_data=False).graph.initializer if i.name == name)
    info = {e.key: int(e.value) for e in init.external_data if e.key in ("offset", "length")}
    with open(bad / "transformer" / "model.onnx.data", "r+b") as fh:
        fh.seek(info["offset"])
        scales = np.frombuffer(fh.read(info["length"]), np.float32) * 2
        fh.seek(info["offset"])
        fh.write(scales.tobytes())
    report = compare_onnx(ckpt, path, sizes=["256x256"], timesteps=[1000.0])
    assert not report.passed and report.cases[0].cosine < 0.9995


def test_the_cache_never_takes_one_scheme_for_another(tiny_q, tmp_path):
    ckpt, folder = tiny_q
    base = Manifest.read(folder).transformer
    variant = Manifest.read(folder).variant
    spec = ExportSpec(TINY_Q, variant, base.size_range, batch_range(variant), "fp32", 21, "gather")
    keys = {json.dumps(dataclasses.replace(spec, quant=q).to_key() if q else spec.to_key(), default=str)
            for q in (None, QuantScheme("int8", 32, None, 1), QuantScheme("int8", 64, None, 1),
                      QuantScheme("int8", 32, None, 4), QuantScheme("int4", 32, None, 4), QuantScheme("fp8", None, "a"),
                      QuantScheme("fp8", None, "b"))}
    assert len(keys) == 7
    assert "quant" not in spec.to_key()  # float exports keep the keys (and caches) they had
    with pytest.raises(ExportError, match=r"other settings \(quant"):
        export_transformer(ckpt, "dev", folder, quant="int4", quant_block=32)


def test_quantized_graph_passes_the_tensorrt_lint_and_fp8_plans_strongly_typed(tiny_q, capsys):
    from hidream_export.build.plan import make_build_plan
    from hidream_export.errors import BuildPlanError
    from hidream_export.lint import lint_onnx

    ckpt, folder = tiny_q
    report = lint_onnx(folder / "transformer" / "model.onnx")
    assert report.ok, report.format()
    manifest = Manifest.read(folder)
    assert make_build_plan(manifest, folder, trt_version="11.1.0", compute_capability="9.0").engine(
        "transformer").flags["quant"] == "int8"
    manifest.transformer.quant.scheme = "fp8"
    plan = make_build_plan(manifest, folder, trt_version="11.1.0", compute_capability="9.0")
    assert plan.engine("transformer").flags["strongly_typed"] and plan.engine("transformer").flags["quant"] == "fp8"
    assert any("FP8" in n for n in plan.notes)
    with pytest.raises(BuildPlanError, match="8.9 or newer"):
        make_build_plan(manifest, folder, trt_version="11.1.0", compute_capability="8.0")
    assert cli_main(["info", str(folder)]) == 0
    assert "quant int8 block 32" in capsys.readouterr().out


# ---- bad input: one line each, nothing written -----------------------------------------------------------

def _calibration_file(path, checkpoint_sha256: str, config=PRESETS["tiny"]):
    amax = {module_of(k): 1.0 for k, s in expected_shapes(config).items() if len(s) == 2}
    path.write_text(json.dumps({"format": 1, "checkpoint_sha256": checkpoint_sha256, "amax": amax}))
    return path


@pytest.mark.parametrize("case", ["block", "fp8_without_calibration", "other_checkpoint", "plugin_lowering",
                                  "old_opset"])
def test_bad_quant_requests_are_one_line(case, tiny_transformer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["export", str(tiny_transformer_dir), "--variant", "dev", "--out", str(out)]
    expect = {
        "block": (["--quant", "int4", "--quant-block", "32"],
                  "weight 'caption_projection.0.linear.weight' has input dimension 24, which 32 does not divide"),
        "fp8_without_calibration": (["--quant", "fp8"], "--quant fp8 needs activation ranges"),
        "other_checkpoint": (["--quant", "fp8", "--calibration", str(_calibration_file(tmp_path / "a.json", "0" * 64))],
                             "was measured on another checkpoint"),
        "plugin_lowering": (["--quant", "int8", "--quant-block", "32", "--moe", "plugin"], "use --moe gather or dense"),
        "old_opset": (["--quant", "int8", "--quant-block", "32", "--opset", "20"], "needs --opset 21"),
    }
    extra, message = expect[case]
    assert cli_main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_calibration_file_errors(tmp_path):
    with pytest.raises(ExportError, match="no such file"):
        CalibrationTable.read(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "checkpoint_sha256": "x", "amax": {"a": -1}}))
    with pytest.raises(ExportError, match="expected a positive number"):
        CalibrationTable.read(tmp_path / "bad.json")
    table = CalibrationTable.read(_calibration_file(tmp_path / "ok.json", "abc"))
    with pytest.raises(ExportError, match="no amax for 'nope'"):
        table.input_amax("nope")


# ---- slow: FP8 calibration end to end, quantized folders, the bounds on `small` -----------------------------

@pytest.mark.slow
def test_fp8_calibrate_export_compare(tiny_models, tmp_path, monkeypatch):
    """calibrate (resumable, fingerprinted) -> export --quant fp8 -> compare against the fp32 reference."""
    from hidream_export.quant import calibrate as cal

    model = tiny_models("dev")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\n\na bowl of fruit\n")
    amax = tmp_path / "amax.json"
    argv = ["calibrate", str(model), "--variant", "dev", "--prompts", str(prompts), "--out", str(amax), "--size",
            "256x256", "--steps", "2", "--quiet"]
    assert cli_main(argv) == 0
    first = json.loads(amax.read_text())
    assert first["prompts"] == 2 and first["steps"] == 2 and len(first["checkpoint_sha256"]) == 64
    # Resume: a partial run that finished the first prompt is continued with the second only.
    partial = amax.with_name(amax.name + cal.PARTIAL_SUFFIX)
    state = {"checkpoint_sha256": first["checkpoint_sha256"], "meta": {k: v for k, v in first.items()
             if k not in ("format", "checkpoint_sha256", "amax")}, "done": 1, "amax": first["amax"]}
    partial.write_text(json.dumps(state))
    runs = []
    original = cal._trajectory
    monkeypatch.setattr(cal, "_trajectory", lambda *a, **k: (runs.append(1), original(*a, **k))[1])
    amax.unlink()
    assert cli_main(argv) == 0 and len(runs) == 1 and not partial.exists()
    assert json.loads(amax.read_text())["amax"] == first["amax"]

    out = tmp_path / "fp8"
    assert cli_main(["export", str(model), "--variant", "dev", "--out", str(out), "--quant", "fp8", "--calibration",
                     str(amax), "--quiet"]) == 0
    report = compare_onnx(model, out / "transformer" / "model.onnx", sizes=["256x256"], timesteps="recipe")
    assert report.passed, report.format()
    q = Manifest.read(out).transformer.quant
    assert q.scheme == "fp8" and q.calibration["checkpoint_sha256"] == first["checkpoint_sha256"]


@pytest.mark.slow
def test_quantized_folder_generates_end_to_end(tmp_path):
    """build --quant int4 --quant-encoders int8, then generate: an image from a quantized folder."""
    from hidream_export.testing.model_folder import write_model_folder

    model = write_model_folder(tmp_path / "model", "dev", TINY_Q, seed=0)
    out = tmp_path / "engines" / "dev"
    assert cli_main(["build", str(model), "--variant", "dev", "--out", str(out), "--quant", "int4", "--quant-block",
                     "32", "--quant-encoders", "int8", "--quiet"]) == 0
    manifest = Manifest.read(out)
    assert manifest.transformer.quant.scheme == "int4"
    assert manifest.components["t5"].quant.scheme == "int8" and manifest.components["llama"].quant.scheme == "int8"
    assert manifest.components["clip_l"].quant is None
    assert cli_main(["generate", str(out), "--prompt", "a fox", "--seed", "1", "--steps", "2", "--quiet", "-o",
                     str(tmp_path / "fox.png")]) == 0
    assert (tmp_path / "fox.png").stat().st_size > 0




@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_transformer(root / "transformer", "small", seed=0)
    return root


@pytest.mark.slow
def test_small_preset_int8_bounds(small_checkpoint, tmp_path):
    """int8 (default block) on the `small` preset at 512x512 and Dev's sampling timesteps: cosine >= 0.9995
    and >= 99% of routed tokens keep their top-2 experts, against the fp32 PyTorch reference (1024x1024 is
    in tools/bench_quant.py and the README). int4 is not held to the 0.99 bound here: block-wise
    round-to-nearest int4 measures ~0.97 on these random weights (README)."""
    out = tmp_path / "int8"
    export_transformer(small_checkpoint, "dev", out, quant="int8")
    report = compare_onnx(small_checkpoint, out / "transformer" / "model.onnx", sizes=["512x512"],
                          timesteps="recipe", min_cosine=0.9995, min_routing=0.99)
    assert report.passed, report.format()
