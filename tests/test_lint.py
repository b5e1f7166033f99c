"""Tests for the TensorRT op-support lint (hidream_export.export.lint).

Every model is built here with onnx.helper, small enough to read: the point is to pin down what the lint says
about each construct the HiDream export can produce (MoE routing, scatter/nonzero lowerings, the plugin node and
its ORT fallback function), not to exercise onnx itself. No torch, no TensorRT."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from hidream_export import lint
from hidream_export.cli import main as cli_main
from hidream_export.lint import ERROR, INFO, WARNING, PluginSpec, lint_onnx, load_op_table
from hidream_export.moe import schema

OPSET = 18


def make_model(nodes, inputs, outputs, initializers=(), *, functions=(), extra_opsets=(), check=True):
    graph = h.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    opsets = [h.make_opsetid("", OPSET)] + [h.make_opsetid(d, v) for d, v in extra_opsets]
    model = h.make_model(graph, opset_imports=opsets, functions=list(functions))
    if check:
        onnx.checker.check_model(model)
    return model


def vi(name, elem=T.FLOAT, shape=(4, 8)):
    return h.make_tensor_value_info(name, elem, list(shape))


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def findings(report, severity=None, op_type=None):
    return [f for f in report.findings
            if (severity is None or f.severity == severity) and (op_type is None or f.op_type == op_type)]


# ---------------------------------------------------------------------------------------------------------------
# The table


def test_table_is_the_tensorrt_10_15_transcription():
    table = load_op_table()
    assert table.tensorrt_version == "10.15"
    assert table.opset_range == (9, 24)
    assert table.source["repository"] == "onnx/onnx-tensorrt"
    assert table.source["path"] == "docs/operators.md"
    assert len(table.ops) == 200
    assert table.ops["ScatterND"].restrictions == "`reduction` other than `none` is not supported"
    assert table.ops["TopK"].restrictions == "`sorted` must be 1. `K` input must be less than 3840."
    assert table.ops["NonZero"].types == ("FP32", "FP16")
    assert table.ops["LayerNormalization"].supported
    assert not table.ops["Unique"].supported
    assert "DOUBLE" in table.supported_types and "FP32" in table.supported_types
    assert "TRT_MoE" in table.custom_ops


# ---------------------------------------------------------------------------------------------------------------
# Builtin ops


def routing_model(sorted_=1, k=2):
    """MoE routing as the HiDream export emits it: logits = x @ W, softmax, top-k."""
    nodes = [h.make_node("MatMul", ["x", "w"], ["logits"], name="gate_matmul"),
             h.make_node("Softmax", ["logits"], ["probs"], name="gate_softmax", axis=-1),
             h.make_node("TopK", ["probs", "k"], ["scores", "experts"], name="gate_topk", sorted=sorted_)]
    return make_model(nodes, [vi("x", shape=(16, 8))],
                      [vi("scores", shape=(16, k)), vi("experts", T.INT64, (16, k))],
                      [const("w", np.zeros((8, 4), np.float32)), const("k", np.array([k], np.int64))])


def test_clean_matmul_softmax_topk_is_ok():
    report = lint_onnx(routing_model())
    assert report.ok, report.format()
    assert not findings(report, ERROR) and not findings(report, WARNING)
    assert report.op_counts == {"MatMul": 1, "Softmax": 1, "TopK": 1}
    assert report.format().splitlines()[-1].startswith("OK:")


def test_topk_unsorted_is_an_error():
    # torch.topk(sorted=False), as in diffusers' MoEGate, exports sorted=0: the table says it must be 1.
    report = lint_onnx(routing_model(sorted_=0))
    assert not report.ok
    [err] = findings(report, ERROR)
    assert err.node == "gate_topk" and "sorted=0" in err.message


def test_topk_k_limit():
    report = lint_onnx(routing_model(k=3840))
    assert any("3840" in f.message for f in findings(report, ERROR, "TopK"))


def scatter_model(op, reduction):
    nodes = [h.make_node(op, ["data", "idx", "upd"], ["out"], name=f"{op.lower()}_0", reduction=reduction)]
    if op == "ScatterND":
        inits = [const("idx", np.zeros((3, 1), np.int64)), const("upd", np.zeros((3, 8), np.float32))]
    else:
        inits = [const("idx", np.zeros((3, 8), np.int64)), const("upd", np.zeros((3, 8), np.float32))]
    return make_model(nodes, [vi("data")], [vi("out")], inits)


def test_scatternd_with_reduction_is_an_error_naming_the_node():
    report = lint_onnx(scatter_model("ScatterND", "add"))
    assert not report.ok
    [err] = findings(report, ERROR)
    assert err.op_type == "ScatterND" and err.node == "scatternd_0"
    assert "reduction='add'" in err.message
    assert "scatternd_0" in report.format()


def test_scatternd_without_reduction_is_clean():
    assert lint_onnx(scatter_model("ScatterND", "none")).ok


def test_scatterelements_reduction_goes_to_the_plugin_with_a_warning():
    report = lint_onnx(scatter_model("ScatterElements", "add"))
    assert report.ok
    [warn] = findings(report, WARNING, "ScatterElements")
    assert "plugin" in warn.message


def test_nonzero_is_a_warning_and_so_are_its_consumers():
    nodes = [h.make_node("Greater", ["x", "zero"], ["mask"], name="gt"),
             h.make_node("NonZero", ["mask"], ["nz"], name="nonzero_0"),
             h.make_node("Transpose", ["nz"], ["idx"], name="tr", perm=[1, 0]),
             h.make_node("GatherND", ["x", "idx"], ["picked"], name="gather"),
             h.make_node("Shape", ["picked"], ["picked_shape"], name="shape_of_picked")]
    model = make_model(nodes, [vi("x")], [h.make_tensor_value_info("picked", T.FLOAT, ["n"]),
                                          h.make_tensor_value_info("picked_shape", T.INT64, [1])],
                       [const("zero", np.zeros((), np.float32))])
    report = lint_onnx(model)
    assert report.ok
    warned = {f.node for f in findings(report, WARNING)}
    assert {"nonzero_0", "tr", "shape_of_picked"} <= warned
    assert "gather" not in warned  # consumes a derived tensor, not NonZero's output; only shapes of it are flagged
    # The table lists NonZero for FP32/FP16 only: the bool mask is flagged too.
    assert any("BOOL" in f.message for f in findings(report, WARNING, "NonZero"))


def test_double_tensor_is_an_error():
    nodes = [h.make_node("Cast", ["x"], ["x64"], name="to_double", to=T.DOUBLE),
             h.make_node("Cast", ["x64"], ["y"], name="to_float", to=T.FLOAT)]
    report = lint_onnx(make_model(nodes, [vi("x")], [vi("y")]))
    assert not report.ok
    errors = findings(report, ERROR)
    assert len(errors) == 1 and errors[0].node == "to_double" and "DOUBLE" in errors[0].message


def test_double_initializer_is_an_error():
    nodes = [h.make_node("Add", ["x", "bias"], ["y"], name="add")]
    model = make_model(nodes, [vi("x", T.DOUBLE)], [vi("y", T.DOUBLE)], [const("bias", np.zeros(8, np.float64))])
    report = lint_onnx(model)
    names = {f.node for f in findings(report, ERROR)}
    assert {"x", "bias"} <= names


def test_unknown_default_domain_op_is_an_error():
    nodes = [h.make_node("Unique", ["x"], ["u"], name="uniq")]
    report = lint_onnx(make_model(nodes, [vi("x")], [h.make_tensor_value_info("u", T.FLOAT, ["n"])]))
    [err] = findings(report, ERROR)
    assert err.node == "uniq" and "not supported" in err.message


def test_op_missing_from_the_table_is_an_error():
    nodes = [h.make_node("NoSuchOp", ["x"], ["y"], name="mystery")]
    report = lint_onnx(make_model(nodes, [vi("x")], [vi("y")], check=False))
    [err] = findings(report, ERROR)
    assert err.op_type == "NoSuchOp" and "not in the TensorRT 10.15" in err.message


def test_unknown_custom_domain_op_is_an_error():
    nodes = [h.make_node("FusedThing", ["x"], ["y"], name="fused", domain="com.example")]
    report = lint_onnx(make_model(nodes, [vi("x")], [vi("y")], extra_opsets=[("com.example", 1)]))
    [err] = findings(report, ERROR)
    assert err.op_type == "com.example::FusedThing" and "unknown custom-domain op" in err.message


def test_subgraphs_are_walked():
    then_g = h.make_graph([h.make_node("ScatterND", ["x", "i", "u"], ["t_out"], name="inner_scatter",
                                       reduction="add")],
                          "then", [], [vi("t_out")])
    else_g = h.make_graph([h.make_node("Identity", ["x"], ["e_out"], name="inner_id")], "else", [], [vi("e_out")])
    nodes = [h.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vi("x"), vi("cond", T.BOOL, ())], [vi("y")],
                       [const("i", np.zeros((3, 1), np.int64)), const("u", np.zeros((3, 8), np.float32))])
    report = lint_onnx(model)
    [err] = findings(report, ERROR)
    assert err.node == "inner_scatter" and "branch.then_branch" in err.where
    assert report.op_counts["ScatterND"] == 1 and report.op_counts["If"] == 1


def test_layernorm_extra_outputs_are_an_error():
    nodes = [h.make_node("LayerNormalization", ["x", "g", "b"], ["y", "mean"], name="ln", axis=-1)]
    model = make_model(nodes, [vi("x")], [vi("y"), vi("mean", shape=(4, 1))],
                       [const("g", np.ones(8, np.float32)), const("b", np.zeros(8, np.float32))])
    [err] = findings(lint_onnx(model), ERROR)
    assert err.node == "ln" and "only Y" in err.message


def test_reduce_axes_must_be_an_initializer():
    nodes = [h.make_node("Shape", ["x"], ["s"], name="shape"),
             h.make_node("Slice", ["s", "zero", "one"], ["axes"], name="slice"),
             h.make_node("ReduceSum", ["x", "axes"], ["y"], name="rsum")]
    model = make_model(nodes, [vi("x")], [h.make_tensor_value_info("y", T.FLOAT, None)],
                       [const("zero", np.array([0], np.int64)), const("one", np.array([1], np.int64))], check=False)
    errors = findings(lint_onnx(model), ERROR)
    assert [e.node for e in errors] == ["rsum"]


# ---------------------------------------------------------------------------------------------------------------
# The HiDreamMoE plugin node and its model-local function


T_, H_, I_, E_, K_ = 16, 8, 12, 4, 2


def moe_function():
    """A stand-in for the ORT fallback body: not the real maths, but it uses the constructs the real body
    might (NonZero, ScatterND with reduction) which must NOT count against a TensorRT build."""
    nodes = [h.make_node("NonZero", ["selected_experts"], ["nz"], name="body_nonzero"),
             h.make_node("ScatterND", ["hidden_states", "idx", "hidden_states"], ["output"], name="body_scatter",
                         reduction="add"),
             h.make_node("Constant", [], ["idx"], name="body_idx",
                         value=const("idx_value", np.zeros((T_, 1), np.int64)))]
    nodes = [nodes[2], nodes[0], nodes[1]]
    return h.make_function(schema.DOMAIN, schema.OP_TYPE, list(schema.INPUT_NAMES), list(schema.OUTPUT_NAMES),
                           nodes, [h.make_opsetid("", OPSET)], list(schema.ATTRIBUTES))


def moe_model(attrs=None, *, with_function=False, selected_dtype=T.INT32, top_k=K_):
    custom_attrs = attrs is not None
    attrs = schema.node_attributes(top_k=top_k, num_experts=E_) if attrs is None else attrs
    node = h.make_node(schema.OP_TYPE, list(schema.INPUT_NAMES), ["moe_out"], name="block0_moe",
                       domain=schema.DOMAIN, **attrs)
    inputs = [vi("hidden_states", shape=(T_, H_)), vi("selected_experts", selected_dtype, (T_, K_)),
              vi("scores", shape=(T_, K_))]
    inits = [const("gate_weights", np.zeros((E_, H_, I_), np.float32)),
             const("up_weights", np.zeros((E_, H_, I_), np.float32)),
             const("down_weights", np.zeros((E_, I_, H_), np.float32))]
    functions = [moe_function()] if with_function else []
    # Deliberately wrong attributes would fail onnx.checker once an export in the same process has
    # registered the HiDreamMoE schema with onnx: the lint, not the checker, is what is under test.
    return make_model([node], inputs, [vi("moe_out", shape=(T_, H_))], inits, functions=functions,
                      extra_opsets=[(schema.DOMAIN, schema.DOMAIN_VERSION)], check=not custom_attrs)


def test_plugin_spec_follows_the_schema_module():
    spec = lint.HIDREAM_MOE_PLUGIN
    assert set(spec.attributes) == set(schema.ATTRIBUTES)
    assert spec.plugin_id == schema.PLUGIN_ID and spec.version == schema.PLUGIN_VERSION
    assert spec.num_inputs == len(schema.INPUT_NAMES) and spec.num_outputs == len(schema.OUTPUT_NAMES)


def test_hidream_moe_node_is_a_plugin_expectation():
    report = lint_onnx(moe_model())
    assert report.ok, report.format()
    [note] = [f for f in findings(report, INFO) if "expects plugin" in f.message]
    assert note.node == "block0_moe"
    assert "expects plugin hidream::HiDreamMoE version 1" in note.message
    assert report.op_counts == {"hidream::HiDreamMoE": 1}
    assert not report.shadowed


def test_hidream_moe_function_body_is_not_parsed_by_tensorrt():
    report = lint_onnx(moe_model(with_function=True))
    assert report.ok, report.format()
    assert any("expects plugin hidream::HiDreamMoE version 1" in f.message for f in report.findings)
    # The body's NonZero and ScatterND(reduction=add) are reported, but only in the separate list.
    assert {f.node for f in report.shadowed} >= {"body_nonzero", "body_scatter"}
    assert any(f.severity == ERROR and f.node == "body_scatter" for f in report.shadowed)
    assert all(f.where == "function hidream::HiDreamMoE" for f in report.shadowed)
    assert not any(f.node.startswith("body_") for f in report.findings)
    assert report.op_counts == {"hidream::HiDreamMoE": 1}
    assert report.shadowed_op_counts["ScatterND"] == 1
    text = report.format()
    assert "replaced by a plugin" in text and text.splitlines()[-1].startswith("OK:")


def test_without_the_plugin_the_function_body_is_what_tensorrt_parses():
    report = lint_onnx(moe_model(with_function=True), plugins=[])
    assert not report.ok
    assert any(f.node == "body_scatter" and f.severity == ERROR for f in report.findings)
    assert not report.shadowed


def test_without_plugin_or_function_the_moe_node_is_an_error():
    report = lint_onnx(moe_model(), plugins=[])
    [err] = findings(report, ERROR)
    assert err.op_type == "hidream::HiDreamMoE" and "unknown custom-domain op" in err.message


def test_wrong_plugin_version_is_an_error():
    attrs = dict(schema.node_attributes(top_k=K_, num_experts=E_), plugin_version="2")
    report = lint_onnx(moe_model(attrs))
    assert not report.ok
    [err] = findings(report, ERROR)
    assert err.node == "block0_moe" and "plugin_version='2'" in err.message


@pytest.mark.parametrize("attrs, needle", [
    ({"plugin_namespace": "hidream", "plugin_version": "1", "top_k": K_}, "num_experts is missing"),
    ({"plugin_namespace": "other", "plugin_version": "1", "top_k": K_, "num_experts": E_}, "plugin_namespace='other'"),
    ({"plugin_namespace": "hidream", "plugin_version": "1", "top_k": "2", "num_experts": E_}, "top_k is STRING"),
    ({"plugin_namespace": "hidream", "plugin_version": "1", "top_k": 3, "num_experts": E_}, "attribute top_k=3"),
])
def test_plugin_attribute_mismatches_are_errors(attrs, needle):
    report = lint_onnx(moe_model(attrs))
    assert not report.ok
    assert any(needle in f.message for f in findings(report, ERROR)), report.format()


def test_plugin_input_dtype_is_checked():
    report = lint_onnx(moe_model(selected_dtype=T.INT64))
    assert any("INT32" in f.message for f in findings(report, ERROR))


def test_extra_plugins_can_be_declared():
    nodes = [h.make_node("MyOp", ["x"], ["y"], name="mine", domain="acme", plugin_namespace="acme")]
    model = make_model(nodes, [vi("x")], [vi("y")], extra_opsets=[("acme", 1)])
    assert not lint_onnx(model).ok
    report = lint_onnx(model, plugins=list(lint.DEFAULT_PLUGINS) + ["acme::MyOp"])
    assert report.ok
    assert any("expects plugin acme::MyOp version 1" in f.message for f in report.findings)
    spec = PluginSpec.parse("acme::MyOp:3")
    assert (spec.namespace, spec.op_type, spec.version) == ("acme", "MyOp", "3")


def test_declared_plugin_without_namespace_attribute():
    nodes = [h.make_node("MyOp", ["x"], ["y"], name="mine", domain="other")]
    model = make_model(nodes, [vi("x")], [vi("y")], extra_opsets=[("other", 1)])
    report = lint_onnx(model, plugins=["acme::MyOp"])
    assert any("namespace" in f.message for f in findings(report, ERROR))


# ---------------------------------------------------------------------------------------------------------------
# Files, external data, the report and `hidream-export lint`


def main_lint(argv):
    return cli_main(["lint", *argv])


def test_external_data_is_never_read(tmp_path):
    model = routing_model()
    path = tmp_path / "routing.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="routing.data", size_threshold=0)
    data_file = tmp_path / "routing.data"
    assert data_file.exists()
    data_file.unlink()
    report = lint_onnx(path)
    assert report.ok, report.format()
    assert report.model == str(path)
    assert report.op_counts["TopK"] == 1


def test_report_to_dict_is_json(tmp_path):
    report = lint_onnx(scatter_model("ScatterND", "add"))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False
    assert data["tensorrt_version"] == "10.15"
    assert data["counts"]["errors"] == 1
    assert data["op_counts"] == {"ScatterND": 1}
    assert data["findings"][0]["node"] == "scatternd_0"


def test_main_exit_codes(tmp_path, capsys):
    clean, broken = tmp_path / "clean.onnx", tmp_path / "broken.onnx"
    onnx.save_model(routing_model(), str(clean))
    onnx.save_model(scatter_model("ScatterND", "add"), str(broken))
    assert main_lint([str(clean)]) == 0
    assert main_lint([str(broken)]) == 1
    out = capsys.readouterr().out
    assert "scatternd_0" in out and "FAIL:" in out

    assert main_lint([str(broken), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False

    missing = tmp_path / "missing.onnx"
    assert main_lint([str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model\n")
    assert main_lint([str(garbage)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(garbage) in err

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert main_lint([str(empty)]) == 2


def test_main_plugin_flags(tmp_path):
    path = tmp_path / "moe.onnx"
    onnx.save_model(moe_model(), str(path))
    assert main_lint([str(path)]) == 0
    assert main_lint([str(path), "--no-plugins"]) == 1


def test_unreadable_file_is_exit_code_2(tmp_path):
    path = tmp_path / "secret.onnx"
    onnx.save_model(routing_model(), str(path))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything: nothing to test
            pytest.skip("running as a user that can read mode-000 files")
        assert main_lint([str(path)]) == 2
    finally:
        path.chmod(0o644)
