"""The `hidream::HiDreamMoE` TensorRT plugin without TensorRT: its shape/type function, autotune
combinations and tactics (plain Python), the single-launch AOT kernel (maths in Triton's CPU interpreter,
PTX compiled for sm_90 and checked against the AOT launch contract), the `tensorrt.plugin` wrappers
(registered against a stand-in module that applies the documented signature rules), and the plugin loader's
errors with a stand-in registry.

Kernel checks run in worker subprocesses (this file re-executed as a script), like tests/test_moe_triton.py:
TRITON_INTERPRET=1 must be set before kernels are decorated and must not leak into this process.
Tolerances (relative to max|reference|): fp32 1e-5; fp16 cosine >= 0.9999 and max error <= 4e-3; bf16
cosine >= 0.999 and max error <= 3e-2 (the reference computes in fp32 from the same rounded inputs).
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from hidream_export import errors
from hidream_export.manifest import PluginRequirement, TransformerComponent, TrtEngineComponent
from hidream_export.moe import aot_kernel as ak
from hidream_export.moe import loader, schema, tactics
from hidream_export.moe import trt_plugin as tp

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'hidream-export[kernels]')")
RESULT_MARK = "TRT_PLUGIN_WORKER="
LOW_PRECISION = {"float16": (0.9999, 4e-3), "bfloat16": (0.999, 3e-2)}

T, H, I, E, K = 37, 48, 80, 4, 2
GOOD = [((T, H), "float16"), ((T, K), "int32"), ((T, K), "float16"), ((E, H, I), "float16"),
        ((E, H, I), "float16"), ((E, I, H), "float16")]


# ================================================================================================
# Shape / type function
# ================================================================================================
def test_output_desc_is_hidden_states_shape_and_dtype():
    out = tp.moe_output_desc(GOOD, top_k=K, num_experts=E)
    assert out == tp.TensorSpec((T, H), "FP16")
    # dynamic token count (unknown at build time) stays unknown; dims agree with schema.check
    dyn = [((None, H), "bf16"), ((None, K), "INT32"), ((None, K), "bfloat16"), ((E, H, I), "BF16"),
           ((E, H, I), "BF16"), ((E, I, H), "BF16")]
    assert tp.moe_output_desc(dyn) == tp.TensorSpec((None, H), "BF16")
    shapes = schema.check([s for s, _ in GOOD])
    assert (shapes.tokens, shapes.hidden) == (T, H)


@pytest.mark.parametrize("index, bad, message", [
    (1, ((T + 1, K), "int32"), "selected_experts must be (T=37, k)"),
    (2, ((T, K + 1), "float16"), "scores must be (T=37, k=2)"),
    (3, ((E, H + 1, I), "float16"), "gate_weights must be (E, H=48, I)"),
    (4, ((E, H, I + 1), "float16"), "up_weights must be (E=4, H=48, I=80)"),
    (5, ((E, H, I), "float16"), "down_weights must be (E=4, I=80, H=48)"),
    (0, ((T, H, 1), "float16"), "hidden_states must be (T, H)"),
])
def test_mismatched_shapes_name_the_input(index, bad, message):
    inputs = list(GOOD)
    inputs[index] = bad
    with pytest.raises(ValueError, match=re.escape(message)):
        tp.moe_output_desc(inputs)


@pytest.mark.parametrize("index, dtype, message", [
    (1, "int64", "selected_experts must be INT32"),
    (2, "float32", "scores is FP32, hidden_states is FP16"),
    (5, "bfloat16", "down_weights is BF16"),
    (0, "int32", "hidden_states must be one of"),
])
def test_bad_dtypes_are_refused(index, dtype, message):
    inputs = list(GOOD)
    inputs[index] = (inputs[index][0], dtype)
    with pytest.raises(ValueError, match=re.escape(message)):
        tp.moe_output_desc(inputs)


def test_attributes_must_match_the_known_dims():
    with pytest.raises(ValueError, match="top_k=3"):
        tp.moe_output_desc(GOOD, top_k=3)
    with pytest.raises(ValueError, match="num_experts=8"):
        tp.moe_output_desc(GOOD, num_experts=8)
    with pytest.raises(ValueError, match="6 inputs"):
        tp.moe_output_desc(GOOD[:5])


@pytest.mark.parametrize("spelling, canon", [("float32", "FP32"), ("FLOAT", "FP32"), ("half", "FP16"),
                                             ("torch.bfloat16", "BF16"), ("BF16", "BF16"), ("tensor(int32)", "INT32")])
def test_dtype_spellings(spelling, canon):
    assert schema.dtype_name(spelling) == canon
    enum_like = types.SimpleNamespace(name=spelling.upper())  # TensorRT's DataType.HALF etc. by enum name
    if spelling.upper() in ("FLOAT", "HALF", "BF16"):
        assert schema.dtype_name(enum_like) == canon


# ================================================================================================
# Autotune combinations and tactics
# ================================================================================================
def test_autotune_combinations_are_the_three_activation_types_with_int32_ids():
    (combo,) = tp.moe_autotune_combinations()
    expanded = combo.expand()
    assert sorted(c[0] for c in expanded) == ["BF16", "FP16", "FP32"]
    for c in expanded:
        assert len(c) == len(schema.INPUT_NAMES) + 1  # six inputs, one output
        assert c[1] == "INT32"
        assert len({c[i] for i in (0, 2, 3, 4, 5, 6)}) == 1  # one activation type for every other I/O
    assert combo.layouts == "LINEAR"
    assert combo.tactics == (1, 2, 3, 4) and all(t > 0 for t in combo.tactics)  # QDP: positive custom tactics
    (fp16_only,) = tp.moe_autotune_combinations(dtypes=["float16"], tactics=[2])
    assert fp16_only.expand() == [("FP16", "INT32", "FP16", "FP16", "FP16", "FP16", "FP16")]
    assert fp16_only.tactics == (2,)


def test_tactic_tables():
    assert [t.id for t in tactics.JIT_TACTICS] == [t.id for t in tactics.AOT_TACTICS] == [1, 2, 3, 4]
    assert tactics.JIT_TACTICS[0].tile is None  # heuristic: moe_triton.default_config per call
    for t in tactics.AOT_TACTICS:
        assert set(t.tile) == {"block_m", "block_n", "block_i", "block_k", "num_warps", "num_stages"}


def test_aot_launch_arithmetic():
    grid, scalars = ak.aot_launch_args(100, 2560, 6912, 32, 128)
    assert grid == 4 * 20 and scalars == [100, 2560, 6912]
    assert ak.AOT_KERNEL_PARAMS == 10  # 6 input pointers, 3 int32 extra args, 1 output pointer


def test_dropping_unused_implicit_ptx_parameters():
    def ptx(body: str) -> str:
        params = [f".param .u64 .ptr .global .align 1 k_param_{i}" for i in range(3)]
        return ".version 8.0\n.visible .entry k(\n\t" + ",\n\t".join(params) + "\n)\n{\n" + body + "\n}\n"

    used_two = "ld.param.b64 %rd1, [k_param_0];\nld.param.b64 %rd2, [k_param_1];"
    out, dropped = ak._drop_unused_trailing_params(ptx(used_two), "k", 2)
    assert dropped == 1 and "k_param_2" not in out and "k_param_1\n)" in out
    with pytest.raises(RuntimeError, match="k_param_2 is used"):
        ak._drop_unused_trailing_params(ptx(used_two + "\nld.param.b64 %rd3, [k_param_2];"), "k", 2)
    with pytest.raises(RuntimeError, match="declares 3 parameters"):
        ak._drop_unused_trailing_params(ptx(used_two), "k", 4)


# ================================================================================================
# Kernel workers (subprocesses)
# ================================================================================================
def _worker_interpret() -> dict:
    """TRITON_INTERPRET=1: the AOT kernel (launched exactly as TensorRT would) against the reference op,
    plus the JIT tactics' tile configs."""
    import torch

    from hidream_export.moe.kernels import MoETileConfig
    from hidream_export.moe.torch_op import moe_reference as moe_experts_reference

    results = {"cases": [], "tiles": []}
    g = torch.Generator().manual_seed(0)
    for dtype, tactic_ids in ((torch.float32, (1, 2, 3, 4)), (torch.float16, (1, 3)), (torch.bfloat16, (2, 4))):
        for tokens in (T, 1):
            x = torch.randn(tokens, H, generator=g)
            sel = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(tokens)]).to(torch.int32)
            scores = torch.rand(tokens, K, generator=g)
            gate, up = (torch.randn(E, H, I, generator=g) / H ** 0.5 for _ in range(2))
            down = torch.randn(E, I, H, generator=g) / I ** 0.5
            args = [t.to(dtype) for t in (x,)] + [sel] + [t.to(dtype) for t in (scores, gate, up, down)]
            ref = moe_experts_reference(*args).float()
            for tactic in tactic_ids:
                out = ak.moe_aot_reference(*args, tactic=tactic).float()
                scale = ref.abs().max().item()
                cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
                results["cases"].append({"dtype": str(dtype).split(".")[1], "tokens": tokens, "tactic": tactic,
                                         "rel": (out - ref).abs().max().item() / scale, "cos": cos,
                                         "shape": list(out.shape)})
    empty = ak.moe_aot_reference(torch.zeros(0, H), torch.zeros(0, K, dtype=torch.int32),
                                         torch.zeros(0, K), torch.zeros(E, H, I), torch.zeros(E, H, I),
                                         torch.zeros(E, I, H))
    results["empty_shape"] = list(empty.shape)
    for tactic in (0, 1, 2, 3, 4):
        for dtype in (torch.float32, torch.bfloat16):
            cfg = tp.tile_config(tactic, 4096, 2, 4, dtype)
            results["tiles"].append({"tactic": tactic, "dtype": str(dtype), "ok": isinstance(cfg, MoETileConfig),
                                     "block_k": cfg.block_k, "stages": cfg.num_stages})
    return results


def _ptxas_candidates() -> list[str]:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [str(p) for p in (bin_dir / "ptxas", bin_dir / "ptxas-blackwell", Path("/usr/local/cuda/bin/ptxas"))
             if p.exists()]
    return found


def _worker_compile() -> dict:
    """Compile-only (no GPU needed): the AOT kernel's PTX for sm_90/sm_80, checked against the AOT launch
    contract, and assembled by any ptxas available."""
    import tempfile

    results = []
    for dtype, tactic, target in (("BF16", 1, "sm90"), ("BF16", 2, "sm90"), ("FP32", 2, "sm90"), ("FP16", 1, "sm80")):
        k = ak.compile_aot_kernel(dtype, K, E, tactic, target=target)
        entry = re.search(r"\.entry\s+" + re.escape(k.name) + r"\s*\((.*?)\)", k.ptx, flags=re.S).group(1)
        params = [p.split()[1] for p in entry.split(",") if p.strip()]
        assembled = []
        arch = "sm_90a" if target == "sm90" else "sm_80"
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(k.ptx)
            for ptxas in _ptxas_candidates():
                r = subprocess.run([ptxas, f"-arch={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                   capture_output=True, text=True)
                assembled.append({"ptxas": ptxas, "rc": r.returncode, "err": r.stderr[-300:]})
        results.append({"dtype": dtype, "tactic": tactic, "target": target, "name": k.name, "params": params,
                        "dropped": k.dropped_params, "shared": k.shared_mem, "num_warps": k.num_warps,
                        "ptx_version": re.search(r"\.version (\S+)", k.ptx).group(1),
                        "ptx_target": re.search(r"\.target (\S+)", k.ptx).group(1), "assembled": assembled})
    return {"kernels": results}


def _run_worker(kind: str, interpret: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.Popen([sys.executable, __file__, kind], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def workers():
    """Both workers, started together (they are independent; the machine has two cores)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    procs = {"interpret": _run_worker("interpret", True), "compile": _run_worker("compile", False)}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        line = next((l for l in stdout.splitlines() if l.startswith(RESULT_MARK)), None)
        out[name] = json.loads(line[len(RESULT_MARK):]) if line else {"error": stderr[-4000:] or stdout[-4000:]}
    return out


def _result(workers, name):
    r = workers[name]
    if "error" in r:
        pytest.fail(f"{name} worker failed:\n{r['error']}")
    return r


@needs_triton
def test_aot_kernel_matches_the_reference(workers):
    r = _result(workers, "interpret")
    assert len(r["cases"]) == 2 * (4 + 2 + 2)
    for c in r["cases"]:
        assert c["shape"] == [c["tokens"], H]
        if c["dtype"] == "float32":
            assert c["rel"] <= 1e-5, c
        else:
            min_cos, max_rel = LOW_PRECISION[c["dtype"]]
            assert c["cos"] >= min_cos and c["rel"] <= max_rel, c
    assert r["empty_shape"] == [0, H]


@needs_triton
def test_jit_tactics_give_valid_tile_configs(workers):
    tiles = _result(workers, "interpret")["tiles"]
    assert all(t["ok"] for t in tiles)
    fp32_fixed = [t for t in tiles if t["tactic"] >= 2 and "float32" in t["dtype"]]
    assert all(t["block_k"] == 16 and t["stages"] == 2 for t in fp32_fixed)  # fits shared memory on sm_80..90


@needs_triton
def test_aot_ptx_fits_the_launch_contract(workers):
    kernels = _result(workers, "compile")["kernels"]
    for k in kernels:
        # exactly what TensorRT passes: 6 input pointers, 3 int32 scalars, 1 output pointer
        assert k["params"] == [".u64"] * 6 + [".u32"] * 3 + [".u64"], k
        assert k["dropped"] >= 0 and k["shared"] <= 48 * 1024 and k["name"] == "_moe_rows_kernel"
        # the oldest PTX ISA for the architecture, so older drivers can JIT it at engine load
        assert (k["ptx_target"], k["ptx_version"]) == (("sm_90a", "8.0") if k["target"] == "sm90" else ("sm_80", "7.8"))
        if k["assembled"]:
            assert any(a["rc"] == 0 for a in k["assembled"]), k["assembled"]


# ================================================================================================
# The tensorrt.plugin wrappers, against a stand-in module
# ================================================================================================
class _FakeTRTP(types.ModuleType):
    """A stand-in for `tensorrt.plugin` that records the decorated functions and applies the documented
    signature rules (paraphrasing tensorrt/plugin/_validate.py): register takes TensorDesc inputs then
    typed attributes and returns TensorDesc(s); impl is (inputs, attrs, outputs, stream[, tactic]);
    autotune is (inputs, attrs, outputs); aot_impl is (inputs, attrs, outputs, tactic) with a 4-tuple
    return annotation. Not TensorRT: a check that our wrappers are written to its documented contract."""

    class TensorDesc:
        def __init__(self, shape_expr=(), dtype=None):
            self.shape_expr, self.dtype = shape_expr, dtype

        def like(self):
            return type(self)(self.shape_expr, self.dtype)

    class Tensor:
        pass

    class AutoTuneCombination:
        def __init__(self, io_types, layouts="LINEAR", tactics=None):
            self.io_types, self.layouts, self.tactics = io_types, layouts, tactics

    class KernelLaunchParams:
        grid_x = block_x = shared_mem = None

    class SymInt32:
        def __init__(self, value):
            self.value = value

    class SymIntExprs(list):
        @classmethod
        def from_tuple(cls, values):
            return cls(values)

    def __init__(self):
        super().__init__("tensorrt.plugin")
        self.defs: dict[str, dict] = {}

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)

    def _def(self, plugin_id):
        if plugin_id not in self.defs:
            raise ValueError(f"Plugin {plugin_id} is not registered")
        return self.defs[plugin_id]

    def register(self, plugin_id, lazy_register=False):
        def deco(fn):
            ns, name = plugin_id.split("::")
            assert ns and "." not in ns and "." not in name
            sig = inspect.signature(fn)
            tensors, attrs = [], {}
            for pname, p in sig.parameters.items():
                assert p.annotation is not inspect.Parameter.empty, f"{pname} has no annotation"
                if inspect.isclass(p.annotation) and issubclass(p.annotation, self.TensorDesc):
                    assert not attrs, "TensorDescs must come before attributes"
                    tensors.append(pname)
                else:
                    assert p.annotation in (int, float, str, bool, bytes), f"{pname}: {p.annotation!r}"
                    assert pname not in ("outputs", "stream", "tactic")
                    attrs[pname] = p.annotation
            ret = sig.return_annotation
            assert inspect.isclass(ret) and issubclass(ret, self.TensorDesc), ret
            self.defs[plugin_id] = {"register": fn, "tensors": tensors, "attrs": attrs}
            return fn
        return deco

    def _check_schema(self, fn, plugin_id, tail):
        d = self._def(plugin_id)
        names = list(inspect.signature(fn).parameters)
        used_attrs = [n for n in d["attrs"] if n in names]
        assert names == d["tensors"] + used_attrs + tail, names
        for n in used_attrs:
            ann = inspect.signature(fn).parameters[n].annotation
            assert ann is inspect.Parameter.empty or ann is d["attrs"][n]
        return d

    def impl(self, plugin_id):
        def deco(fn):
            self._check_schema(fn, plugin_id, ["outputs", "stream", "tactic"])["impl"] = fn
            return fn
        return deco

    def autotune(self, plugin_id):
        def deco(fn):
            self._check_schema(fn, plugin_id, ["outputs"])["autotune"] = fn
            return fn
        return deco

    def aot_impl(self, plugin_id):
        def deco(fn):
            d = self._check_schema(fn, plugin_id, ["outputs", "tactic"])
            ret = inspect.signature(fn).return_annotation
            assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == 4, ret
            assert typing.get_args(ret)[2] is self.KernelLaunchParams and typing.get_args(ret)[3] is self.SymIntExprs
            d["aot"] = fn
            return fn
        return deco


class _Expr:
    """A ShapeExpr stand-in: a build-time constant, a dynamic dim, or a fake (outside a shape context)."""

    def __init__(self, value=None, fake=False):
        self.value, self.is_fake = value, fake

    @property
    def is_constant(self):
        return self.value is not None

    def constant_value(self):
        return self.value


@pytest.fixture
def fake_trtp(monkeypatch):
    fake = _FakeTRTP()
    parent = types.ModuleType("tensorrt")
    parent.__version__ = "0.0-fake"
    parent.plugin = fake
    monkeypatch.setitem(sys.modules, "tensorrt", parent)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", fake)
    monkeypatch.setattr(tp, "_STATE", {"register": False, "autotune": False, "jit": False, "aot": False})
    return fake


def _descs(fake, shapes, dtype="HALF"):
    names = {0: dtype, 1: "INT32"}
    return [fake.TensorDesc([_Expr(d) for d in shape], types.SimpleNamespace(name=names.get(i, dtype)))
            for i, shape in enumerate(shapes)]


def test_registered_wrappers_follow_the_documented_signatures(fake_trtp):
    status = tp.register_plugin(jit=True, aot=HAS_TRITON)
    d = fake_trtp.defs[schema.PLUGIN_ID]
    assert d["tensors"] == list(schema.INPUT_NAMES) and list(d["attrs"]) == ["top_k", "num_experts"]
    assert status["register"] and status["autotune"] and status["jit"] and status["aot"] == HAS_TRITON
    # shape function: dynamic T, constant weight dims; the output is hidden_states' descriptor
    shapes = [(None, H), (None, K), (None, K), (E, H, I), (E, H, I), (E, I, H)]
    out = d["register"](*_descs(fake_trtp, shapes), top_k=K, num_experts=E)
    assert isinstance(out, fake_trtp.TensorDesc) and out.dtype.name == "HALF"
    with pytest.raises(ValueError, match="num_experts=8"):
        d["register"](*_descs(fake_trtp, shapes), top_k=K, num_experts=8)
    bad = list(shapes)
    bad[5] = (E, H, I)
    with pytest.raises(ValueError, match="down_weights"):
        d["register"](*_descs(fake_trtp, bad), top_k=K, num_experts=E)
    # outside a shape context every dim is fake: only rank and dtype are checked
    fake_dims = [fake_trtp.TensorDesc([_Expr(fake=True) for _ in s], types.SimpleNamespace(name="BF16" if i != 1
                                      else "INT32")) for i, s in enumerate(shapes)]
    assert d["register"](*fake_dims, top_k=K, num_experts=E).dtype.name == "BF16"
    # autotune wrapper hands over the plain combinations
    (combo,) = d["autotune"](*_descs(fake_trtp, shapes), K, E, ())
    assert combo.io_types == tp.moe_autotune_combinations()[0].io_types and combo.tactics == [1, 2, 3, 4]
    # registering again is a no-op
    assert tp.register_plugin(jit=True)["jit"]


@needs_triton
def test_aot_wrapper_returns_kernel_launch_and_scalars(fake_trtp):
    if type(ak._moe_rows_kernel).__name__ == "InterpretedFunction":
        pytest.skip("TRITON_INTERPRET=1 in this process: kernels cannot be compiled")
    tp.register_plugin(jit=False, aot=True)
    aot = fake_trtp.defs[schema.PLUGIN_ID]["aot"]
    descs = _descs(fake_trtp, [(64, 2560), (64, K), (64, K), (E, 2560, 6912), (E, 2560, 6912), (E, 6912, 2560)], "BF16")
    for d in descs:  # the AOT wrapper reads symbolic dims; integers stand in for them here
        d.shape_expr = [e.value for e in d.shape_expr]
    descs[0].dtype = "bfloat16"
    name, ptx, launch, extra = aot(*descs, K, E, (), 1)
    tile = tactics.AOT_TACTICS[0].tile
    assert name == b"_moe_rows_kernel" and ptx.startswith(b"//") and b".entry _moe_rows_kernel" in ptx
    assert launch.grid_x == (64 // tile["block_m"]) * (2560 // tile["block_n"])
    assert launch.block_x == tile["num_warps"] * 32 and 0 < launch.shared_mem <= 48 * 1024
    assert [s.value for s in extra] == [64, 2560, 6912]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_register_without_tensorrt_says_what_is_missing():
    with pytest.raises(errors.PluginRegistrationError, match="tensorrt.plugin is not importable"):
        tp.register_plugin()


# ================================================================================================
# Plugin loader
# ================================================================================================
class FakeCreator:
    def __init__(self, name, version="1", namespace=""):
        self.name, self.plugin_version, self.plugin_namespace = name, version, namespace


class FakeRegistry:
    """The two calls the loader makes on TensorRT's IPluginRegistry: get_creator and all_creators."""

    def __init__(self, *creators):
        self.creators = list(creators)

    def get_creator(self, name, version, namespace=""):
        return next((c for c in self.creators if (c.name, c.plugin_version, c.plugin_namespace)
                     == (name, version, namespace)), None)

    @property
    def all_creators(self):
        return self.creators


OURS = {"name": "HiDreamMoE", "namespace": "hidream", "version": "1", "implementation": "jit",
        "needed_by": "transformer/transformer.trt11.1.0.sm90.plan"}


def test_missing_plugin_error_says_which_version_who_and_how(monkeypatch):
    monkeypatch.delenv(loader.PLUGIN_PATH_ENV, raising=False)

    def cannot_register():
        raise ImportError("No module named 'triton'")

    registry = FakeRegistry(FakeCreator("Other", "1", "hidream"), FakeCreator("GroupNorm"))
    with pytest.raises(errors.MissingPluginError) as err:
        loader.ensure_plugins([OURS], registry=registry, register_python=cannot_register)
    text = str(err.value)
    for needle in ("TensorRT plugin hidream::HiDreamMoE version 1 is not registered",
                   "needed by transformer/transformer.trt11.1.0.sm90.plan",
                   "the Python plugin could not be registered: No module named 'triton'",
                   "HIDREAM_PLUGIN_PATH: none (variable unset)", "in the same namespace: hidream::Other v1",
                   "pip install 'hidream-export[gpu,kernels]'", "must never be deserialized without it"):
        assert needle in text, text


def test_python_plugin_is_registered_when_missing():
    registry = FakeRegistry()
    calls = []

    def register():
        calls.append(1)
        registry.creators.append(FakeCreator("HiDreamMoE", "1", "hidream"))

    status = loader.ensure_plugins([OURS], registry=registry, register_python=register, plugin_paths=[])
    assert calls == [1] and status[0]["source"].startswith("python")
    # now present: nothing more to do
    assert loader.ensure_plugins([OURS], registry=registry, register_python=register, plugin_paths=[])[0]["source"] \
        == "already registered" and calls == [1]


def test_runtime_skips_aot_plugins_but_build_needs_them():
    aot = dict(OURS, implementation="aot")
    assert loader.ensure_plugins([aot], phase="runtime", registry=FakeRegistry()) == []
    with pytest.raises(errors.MissingPluginError):
        loader.ensure_plugins([aot], phase="build", registry=FakeRegistry(), plugin_paths=[],
                              register_python=lambda: None)


def test_foreign_and_wrong_version_plugins(monkeypatch):
    monkeypatch.delenv(loader.PLUGIN_PATH_ENV, raising=False)
    with pytest.raises(errors.MissingPluginError, match="not a hidream-export plugin"):
        loader.ensure_plugins([{"name": "FancyNorm", "namespace": "acme"}], registry=FakeRegistry())
    with pytest.raises(errors.MissingPluginError, match="provides version 1"):
        loader.ensure_plugins([dict(OURS, version="2")], registry=FakeRegistry())


def test_plugin_libraries_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(loader.PLUGIN_PATH_ENV, str(tmp_path / "libmissing.so"))
    with pytest.raises(errors.MissingPluginError, match="HIDREAM_PLUGIN_PATH names .*libmissing.so"):
        loader.ensure_plugins([OURS], registry=FakeRegistry())
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to load as a stand-in plugin library")
    import ctypes as _ctypes

    path = _ctypes.CDLL(libm)._name
    resolved = next((p for p in ("/lib/x86_64-linux-gnu/" + path, "/usr/lib/x86_64-linux-gnu/" + path, path)
                     if os.path.isabs(p) and os.path.exists(p)), None)
    if resolved is None:
        pytest.skip("cannot locate libm's file")
    monkeypatch.setenv(loader.PLUGIN_PATH_ENV, os.pathsep.join([resolved]))
    assert loader.plugin_library_paths() == [Path(resolved)]
    with pytest.raises(errors.MissingPluginError, match=re.escape(f"HIDREAM_PLUGIN_PATH: {resolved}")):
        loader.ensure_plugins([OURS], registry=FakeRegistry(), register_python=lambda: None)


def test_requirements_from_onnx_and_manifest():
    from onnx import TensorProto, helper

    moe = helper.make_node(schema.OP_TYPE, list(schema.INPUT_NAMES), ["y"], domain=schema.DOMAIN,
                           **schema.node_attributes(K, E))
    local = helper.make_node("Helper", ["y"], ["z"], domain="mine")  # inlined from its local function
    custom = helper.make_node("Mystery", ["z"], ["w"], domain="vendor")  # no function: needs a plugin
    func = helper.make_function("mine", "Helper", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                                [helper.make_opsetid("", 20)])
    moe_func = helper.make_function(schema.DOMAIN, schema.OP_TYPE, list(schema.INPUT_NAMES), ["output"],
                                    [helper.make_node("Identity", ["hidden_states"], ["output"])],
                                    [helper.make_opsetid("", 20)])
    graph = helper.make_graph([moe, local, custom], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in schema.INPUT_NAMES],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, functions=[func, moe_func],
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(schema.DOMAIN, 1),
                                             helper.make_opsetid("mine", 1), helper.make_opsetid("vendor", 1)])
    reqs = loader.requirements_from_onnx(model, needed_by="m.onnx")
    assert [(r.name, r.namespace, r.version) for r in reqs] == [("HiDreamMoE", "hidream", "1"), ("Mystery", "vendor", "1")]
    entry = TransformerComponent("transformer/model.onnx", {}, plugin=PluginRequirement("HiDreamMoE", "hidream", "1"))
    (req,) = loader.requirements_of(entry)
    assert req.name == "HiDreamMoE" and req.needed_by == "transformer/model.onnx"
    engine = TrtEngineComponent("transformer/x.plan", {}, plugins=[PluginRequirement.from_dict(dict(OURS, implementation="aot"))])
    assert loader.requirements_of(engine)[0].implementation == "aot"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_ensure_plugins_without_tensorrt():
    assert loader.ensure_plugins([]) == []
    with pytest.raises(errors.TensorRTUnavailable, match="TensorRT is not installed"):
        loader.ensure_plugins([OURS])


# ================================================================================================
if __name__ == "__main__":
    kind = sys.argv[1]
    payload = _worker_interpret() if kind == "interpret" else _worker_compile()
    print(RESULT_MARK + json.dumps(payload))
