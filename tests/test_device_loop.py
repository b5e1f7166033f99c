"""The I/O-bound sampling loop's pieces, on the CPU provider: arrays that stay where ONNX Runtime runs,
their one-operator graphs (checked against the onnx package as the oracle), and schedulers stepping them
bit for bit like numpy."""

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from hidream_export.runtime.backends import OrtBackend
from hidream_export.runtime.device import DeviceArray, device_for, op_model_bytes
from hidream_export.runtime.schedulers import FlashFlowEulerScheduler, FlowUniPCScheduler


@pytest.fixture(scope="module")
def device():
    return device_for(ort, ["CPUExecutionProvider"])


def test_op_model_bytes_equal_what_onnx_helper_builds():
    """The hand-written protobuf is the model onnx.helper builds from the same description, field for
    field, and passes onnx's checker."""
    got = onnx.load_from_string(op_model_bytes("Cast", [("x0", "float32", 4)], ("y", "bfloat16", 4), {"to": 16}))
    node = helper.make_node("Cast", ["x0"], ["y"], name="cast", to=16)
    graph = helper.make_graph([node], "hidream_cast",
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [None] * 4)],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [None] * 4)])
    want = helper.make_model(graph, producer_name="hidream-export", ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17)])
    assert got == want
    onnx.checker.check_model(got)
    two = onnx.load_from_string(op_model_bytes("Sub", [("x0", "float32", 0), ("x1", "float32", 3)],
                                               ("y", "float32", 3)))
    onnx.checker.check_model(two)
    assert [n.op_type for n in two.graph.node] == ["Sub"] and list(two.graph.node[0].input) == ["x0", "x1"]
    assert [len(i.type.tensor_type.shape.dim) for i in two.graph.input] == [0, 3]


def test_operators_match_numpy_bit_for_bit(device):
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 3, 5), dtype=np.float32) for _ in range(2))
    A, B = device.upload(a), device.upload(b)
    s = np.float32(0.3712)
    cases = {
        "scalar * a": (s * A, s * a), "a * scalar": (A * s, a * s), "a - b": (A - B, a - b), "a + b": (A + B, a + b),
        "(a - b) / scalar": ((A - B) / np.float32(1.7), (a - b) / np.float32(1.7)), "-a": (-A, -a),
        "1 - a": (np.float32(1) - A, np.float32(1) - a), "python float": (0.5 * A + B, 0.5 * a + b),
        "rows": (A[1:2], a[1:2]), "all rows": (A[:], a[:]), "repeat": (A[0:1].repeat_rows(3), np.repeat(a[0:1], 3, 0)),
        "to fp16": (A.astype(np.float16), a.astype(np.float16)),
        "to bf16": (A.astype(ml_dtypes.bfloat16), a.astype(ml_dtypes.bfloat16)),
        "bf16 upload": (device.upload(a.astype(ml_dtypes.bfloat16)).astype(np.float32),
                        a.astype(ml_dtypes.bfloat16).astype(np.float32)),
    }
    for name, (got, want) in cases.items():
        assert isinstance(got, DeviceArray), name
        host = got.numpy()
        assert host.dtype == want.dtype and host.shape == want.shape, name
        assert np.array_equal(host.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)), name
    # Immutable: an operation never writes through to its inputs.
    assert np.array_equal(A.numpy(), a)


def test_numpy_promotion_is_refused_not_imitated(device):
    """numpy widens float32 by a float64 scalar or array; the device loop refuses instead of silently
    computing something else (the guard behind the bit-for-bit promise)."""
    A = device.upload(np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="float64 scalar would widen"):
        np.float64(2) * A
    with pytest.raises(TypeError, match="mixed dtypes"):
        A + A.astype(np.float16)
    with pytest.raises(TypeError, match="Device.upload"):
        A + np.ones((2, 2), np.float32)
    with pytest.raises(TypeError, match="only a\\[start:stop\\]"):
        A[0, 1]


@pytest.mark.parametrize("cls", [FlowUniPCScheduler, FlashFlowEulerScheduler])
@pytest.mark.parametrize("flavour", ["diffusers", "official"])
def test_schedulers_step_device_arrays_bit_for_bit(device, cls, flavour):
    """The same scheduler code steps DeviceArrays: 12 steps give numpy's latents exactly, including
    UniPC's multistep history and the flash scheduler's re-noising."""
    host, dev = cls(shift=3.0, flavour=flavour), cls(shift=3.0, flavour=flavour)
    host.set_timesteps(12)
    dev.set_timesteps(12)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    X = device.upload(x)
    for i in range(12):
        v = rng.standard_normal(x.shape, dtype=np.float32)
        noise = rng.standard_normal(x.shape, dtype=np.float32) if host.needs_noise else None
        x = host.step(v, i, x, noise)
        X = dev.step(device.upload(v), i, X, None if noise is None else device.upload(noise))
        assert isinstance(X, DeviceArray)
    assert np.array_equal(X.numpy(), x)


def test_run_bound_equals_run(tiny_export, device):
    """A transformer session fed and read through I/O binding returns run()'s outputs exactly."""
    from hidream_export.compare.parity import random_feed
    from hidream_export.manifest import Manifest

    folder, _ = tiny_export("gather")
    manifest = Manifest.read(folder)
    backend = OrtBackend(providers=["CPUExecutionProvider"], threads=1)
    session = backend.load(manifest.file_path(folder, "transformer"), manifest.transformer)
    feed = random_feed(manifest.transformer, 256, 256, 1, seed=0)
    want = session.run(feed)["sample"]
    got = session.run_bound({k: device.upload(v) for k, v in feed.items()}, backend.device())
    assert isinstance(got["sample"], DeviceArray)
    assert np.array_equal(got["sample"].numpy(), want)


# --- the Pipeline's sampling loop on the device ----------------------------------------------------------

def _spy(pipe, monkeypatch):
    """Count the transformer's host and device calls."""
    from hidream_export.runtime.backends import OrtSession

    calls = {"run": 0, "run_bound": 0}
    session = pipe.sessions["transformer"]
    for name in calls:
        original = getattr(OrtSession, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            if args[0] is session:
                calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(OrtSession, name, counted)
    return calls


@pytest.mark.parametrize("variant", ["full", "dev"])
def test_io_bound_loop_gives_the_host_loops_images_bit_for_bit(built, variant, monkeypatch):
    """Full (UniPC, the CFG pair as one batch) and Dev (flash Euler, re-noised every step): the device loop
    on the CPU provider returns the host loop's latents and image exactly, and really runs on the device
    (every step through I/O binding, none through run())."""
    from hidream_export.runtime import Pipeline
    from hidream_export.runtime.pipeline import GenerationRequest

    folder = built.folder(variant)
    host = Pipeline.from_dir(folder, providers=["CPUExecutionProvider"], threads=1, verify=False)
    bound = Pipeline.from_dir(folder, providers=["CPUExecutionProvider"], threads=1, verify=False, io_binding=True)
    assert host.device is None and bound.device is not None  # by default only a GPU provider binds
    kw = dict(width=128, height=128, steps=3, seed=5, any_size=True, return_latents=True)
    want = host("a red fox in the snow", **kw)
    calls = _spy(bound, monkeypatch)
    seen = []
    got = bound("a red fox in the snow", callback=lambda i, t, x: seen.append(type(x)), **kw)
    assert calls == {"run": 0, "run_bound": 3}
    assert seen == [np.ndarray] * 3  # callbacks get host arrays
    assert np.array_equal(got.latents, want.latents) and np.array_equal(got.array, want.array)
    assert got.image.tobytes() == want.image.tobytes()
    # Batched requests of different lengths and guidance (the active rows change mid-loop).
    requests = [GenerationRequest("a cat", seed=1, width=128, height=128, steps=2, any_size=True),
                GenerationRequest("a dog", seed=2, width=128, height=128, steps=3, any_size=True,
                                  guidance_scale=0.0)]
    for a, b in zip(host.generate_batch(requests), bound.generate_batch(requests)):
        assert np.array_equal(a.array, b.array)


def test_io_binding_and_provider_choices_fail_in_one_line(built, capsys, tmp_path):
    from hidream_export.cli import main as cli_main
    from hidream_export.errors import BackendUnavailable
    from hidream_export.runtime import Pipeline

    with pytest.raises(BackendUnavailable, match="has no I/O binding"):
        Pipeline.from_dir(built.folder("full"), backend=_NoDeviceBackend(), verify=False, io_binding=True)
    argv = ["generate", str(built.folder("full")), "--prompt", "a", "-o", str(tmp_path / "a.png"), "--quiet"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert cli_main([*argv, "--provider", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install onnxruntime-gpu" in err, err
    assert cli_main([*argv, "--provider", "cpu", "--providers", "CPUExecutionProvider"]) == 2
    assert "give one" in capsys.readouterr().err
    assert cli_main([*argv, "--provider", "cpu", "--no-io-binding", "--steps", "1"]) == 0
    assert (tmp_path / "a.png").is_file()


class _NoDeviceBackend(OrtBackend):
    """An ort backend as a backend without I/O binding looks to the Pipeline."""

    device = None

    def __init__(self):
        super().__init__(providers=["CPUExecutionProvider"], threads=1)
