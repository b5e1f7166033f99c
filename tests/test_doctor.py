"""`hidream-export doctor`: what this machine can do, with reasons, and the test skip helpers built on it.

Assertions depend on what is installed, so each one is conditional on the machine's facts: on the
CPU-only CI machines (no TensorRT, no GPU, ONNX Runtime CPU, Triton present) every branch below that
says "missing" is the one exercised.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from hidream_export import doctor
from hidream_export.cli import main as cli_main
from hidream_export.testing import marks


@pytest.fixture(scope="module")
def report():
    return doctor.doctor()


def test_report_structure_and_json(report):
    assert set(report) == {"python", "platform", "libraries", "gpu", "backends", "build_targets"}
    assert {"tensorrt", "cuda-python", "onnxruntime", "triton", "torch", "polygraphy"} <= set(report["libraries"])
    assert set(report["backends"]) == {"ort", "trt"}
    assert set(report["build_targets"]) == {"onnx", "trt_engines", "triton_lowering"}
    for group in ("libraries", "backends", "build_targets"):
        for name, item in report[group].items():
            assert isinstance(item["available"], bool), name
            assert item["available"] or item["reason"], f"{group}.{name} is unavailable without a reason"
    json.dumps(report)  # JSON-able (the CLI's --json)


def test_tensorrt_missing_is_explained(report):
    trt = report["libraries"]["tensorrt"]
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    assert not trt["available"]
    assert "not installed" in trt["reason"] and "hidream-export[gpu]" in trt["reason"]
    assert not report["backends"]["trt"]["available"] and "tensorrt" in report["backends"]["trt"]["reason"]
    assert not report["build_targets"]["trt_engines"]["available"]
    assert marks.tensorrt_skip_reason().startswith("TensorRT engines unavailable here: ")


def test_onnxruntime_cpu_backend(report):
    ort = report["backends"]["ort"]
    assert ort["available"] and "CPUExecutionProvider" in ort["providers"]
    assert report["libraries"]["onnxruntime"]["version"]


def test_no_gpu_is_explained(report):
    if report["gpu"]["available"]:
        pytest.skip("this machine has a GPU")
    assert report["gpu"]["reason"]
    assert "no GPU" in report["backends"]["trt"]["reason"]
    lowering = report["build_targets"]["triton_lowering"]
    assert not lowering["available"] and "interpreter" in lowering["reason"]
    assert marks.gpu_skip_reason().startswith("no GPU")


def test_triton_modes(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = doctor.doctor()["libraries"]["triton"]
    assert triton["available"] and triton["interpreter"] and "interpreter" in triton["mode"]
    monkeypatch.delenv("TRITON_INTERPRET")
    triton = doctor.doctor()["libraries"]["triton"]
    assert not triton["interpreter"]


def test_onnx_export_target(report):
    onnx_target = report["build_targets"]["onnx"]
    have = all(importlib.util.find_spec(m) for m in ("torch", "onnx", "onnxscript"))
    assert onnx_target["available"] == bool(have)


def test_text_report(report):
    text = doctor.format_doctor(report)
    assert text.startswith("hidream-export doctor")
    for section in ("libraries:", "gpu:", "backends:", "build targets:"):
        assert section in text
    assert "onnxruntime" in text and "CPUExecutionProvider" in text
    if not report["libraries"]["tensorrt"]["available"]:
        assert "--  tensorrt" in text and "why: not installed" in text


def test_cli_entry_points(capsys):
    assert cli_main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "backends" in data
    assert cli_main(["doctor"]) == 0
    assert "build targets:" in capsys.readouterr().out


def test_skip_marks_carry_doctors_reason():
    mark = marks.requires_tensorrt()
    reason = marks.tensorrt_skip_reason()
    assert mark.mark.name == "skipif"
    assert mark.mark.args[0] == (reason is not None)
    assert mark.mark.kwargs["reason"] == (reason or "")
    gpu = marks.requires_gpu()
    assert gpu.mark.args[0] == (marks.gpu_skip_reason() is not None)


@marks.requires_tensorrt()
def test_marked_tests_only_run_where_tensorrt_builds_engines():
    """Runs only where doctor says TensorRT engines can be built; elsewhere skipped with doctor's reason."""
    import tensorrt

    assert tensorrt.__version__
