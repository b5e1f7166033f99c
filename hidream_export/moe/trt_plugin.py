"""The TensorRT plugin `hidream::HiDreamMoE`, as a Python "quickly deployable plugin" (`tensorrt.plugin`).

The op contract (inputs, attributes, shapes, dtypes) is `schema.py`; this module only says how TensorRT
runs it. Two layers, so that everything except the TensorRT glue is testable without TensorRT:

* Plain Python (no tensorrt, no torch): the shape/type function `moe_output_desc` (schema.check on what
  TensorRT knows at build time) and the type/format combinations `moe_autotune_combinations`. Tests call
  these directly.
* `register_plugin()`: imports `tensorrt.plugin` and registers thin decorated wrappers around the plain
  functions (`@trtp.register`, `@trtp.autotune`, `@trtp.impl`, `@trtp.aot_impl`). Nothing TensorRT-related
  happens at import time, so importing this module never needs TensorRT.

Two implementations:

* JIT (`@trtp.impl`, the default): a Python callback at inference time that runs the Triton grouped-GEMM
  pipeline of kernels.py (sort/pad by expert -> gate/up GEMM + SwiGLU -> down GEMM -> weighted combine)
  through torch on TensorRT's stream. Fast, but the engine then needs Python + torch + Triton at runtime.
* AOT (`@trtp.aot_impl`): one precompiled kernel baked into the engine (aot_kernel.py), so the engine runs
  without Python; exact but slower.

Write no `from __future__ import annotations` here: `tensorrt.plugin` inspects the annotation objects of
the decorated functions (`issubclass(param.annotation, TensorDesc)`), and string annotations break that.
"""

import dataclasses
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from hidream_export.errors import PluginRegistrationError

from . import aot_kernel, schema
from .tactics import JIT_TACTICS, TACTIC_IDS, find_tactic

__all__ = [
    "TensorSpec", "moe_output_desc", "tile_config", "AutotuneCombination", "moe_autotune_combinations",
    "register_plugin", "registered",
]

NUM_INPUTS = len(schema.INPUT_NAMES)


# ================================================================================================
# Shape / type function (plain Python)
# ================================================================================================
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What the shape/type function sees of one tensor: its dims (int, or None when not known at build
    time: a dynamic dimension) and its dtype (canonical name, schema.dtype_name)."""

    shape: Tuple[Optional[int], ...]
    dtype: str

    @classmethod
    def of(cls, value) -> "TensorSpec":
        if isinstance(value, TensorSpec):
            return value
        shape, dtype = value
        return cls(tuple(None if d is None else int(d) for d in shape), schema.dtype_name(dtype))


def moe_output_desc(inputs: Sequence, *, top_k: Optional[int] = None,
                    num_experts: Optional[int] = None) -> TensorSpec:
    """The plugin's shape/type function: six input TensorSpecs (or (shape, dtype) pairs) -> the output's
    (T, H) in the activation dtype. The node attributes `top_k` / `num_experts` are checked against the
    known dims too (the parser passes them on as plugin fields, so a mismatch would otherwise only show
    as wrong results). Raises MoEContractError, as every consumer of the contract does."""
    specs = [TensorSpec.of(x) for x in inputs]
    shapes = schema.check([s.shape for s in specs], [s.dtype for s in specs], top_k=top_k, num_experts=num_experts)
    known = lambda d: d if isinstance(d, int) else None  # noqa: E731
    return TensorSpec((known(shapes.tokens), known(shapes.hidden)), specs[0].dtype)


# ================================================================================================
# Tactics and type/format combinations (plain Python)
# ================================================================================================
def tile_config(tactic: int, tokens: int, top_k: int, num_experts: int, dtype):
    """The MoETileConfig a JIT tactic runs with (imports the Triton kernels module, hence torch).

    fp32 tiles get a shorter K step and two stages, like kernels.default_config, so a fixed tactic
    still fits shared memory on sm_80..sm_90."""
    import torch

    from .kernels import MoETileConfig, default_config

    t = find_tactic(JIT_TACTICS, tactic)
    if t.tile is None:
        return default_config(tokens, top_k, num_experts, dtype)
    tile = dict(t.tile)
    if dtype == torch.float32:
        tile.update(block_k=16, num_stages=2)
    return MoETileConfig(**tile)


@dataclasses.dataclass(frozen=True)
class AutotuneCombination:
    """One `tensorrt.plugin.AutoTuneCombination`, as data: the I/O types string (7 positions: the six
    inputs then the output; '|' = options that go together, QDP's dependent-combination grammar), the
    formats and the tactic ids."""

    io_types: str
    layouts: str = "LINEAR"
    tactics: Tuple[int, ...] = TACTIC_IDS

    def expand(self) -> List[Tuple[str, ...]]:
        """The concrete per-I/O type tuples this combination admits (QDP's '|' rule: option i of every
        multi-option position goes together; single-option positions are fixed)."""
        positions = [p.strip().split("|") for p in self.io_types.split(",")]
        n = max(len(p) for p in positions)
        if any(len(p) not in (1, n) for p in positions):
            raise ValueError(f"dependent type lists of different lengths in {self.io_types!r}")
        return [tuple(p[0] if len(p) == 1 else p[i] for p in positions) for i in range(n)]


def moe_autotune_combinations(dtypes: Iterable[str] = schema.ACTIVATION_TYPES,
                              tactics: Optional[Iterable[int]] = None) -> List[AutotuneCombination]:
    """The plugin's supported type/format combinations: every activation I/O in one of `dtypes` (all the
    same), expert ids INT32, linear layouts; each with the custom tactics (tile configs) to time."""
    options = "|".join(schema.dtype_name(d) for d in dtypes)
    types = [schema.INDEX_TYPE if i == schema.SELECTED_INDEX else options for i in range(NUM_INPUTS + 1)]
    return [AutotuneCombination(", ".join(types), "LINEAR", tuple(tactics) if tactics is not None else TACTIC_IDS)]



# ================================================================================================
# JIT implementation helpers (torch on TensorRT's stream)
# ================================================================================================
_TORCH_VIEW = {  # canonical dtype -> (CUDA array interface typestr of the same width, torch dtype name)
    "FP32": ("<f4", "float32"), "FP16": ("<f2", "float16"), "BF16": ("<i2", "bfloat16"), "INT32": ("<i4", "int32"),
    "INT64": ("<i8", "int64"),
}


class _DeviceBuffer:
    """A CUDA array interface over a TensorRT plugin tensor. `trtp.Tensor` has one itself, but it refuses
    BF16 (numpy has no bf16): we describe bf16 as int16 and reinterpret in torch."""

    def __init__(self, ptr: int, shape, strides_elems, typestr: str, itemsize: int):
        self.__cuda_array_interface__ = {
            "shape": tuple(int(d) for d in shape), "typestr": typestr, "data": (int(ptr), False), "version": 3,
            "strides": None if strides_elems is None else tuple(int(s) * itemsize for s in strides_elems),
            "stream": None,  # we already run on TensorRT's stream: no synchronisation wanted
        }


def _as_torch(tensor):
    """A zero-copy torch view of a `trtp.Tensor` (any dtype of the contract, bf16 included)."""
    import torch

    dtype = schema.dtype_name(tensor.dtype)
    typestr, torch_name = _TORCH_VIEW[dtype]
    shape = tuple(int(d) for d in tensor.shape)
    torch_dtype = getattr(torch, torch_name)
    if any(d == 0 for d in shape):
        return torch.empty(shape, dtype=torch_dtype, device="cuda")
    strides = getattr(tensor, "strides", None)
    itemsize = int(typestr[-1])
    view = torch.as_tensor(_DeviceBuffer(tensor.data_ptr, shape, strides, typestr, itemsize), device="cuda")
    return view.view(torch_dtype) if view.dtype != torch_dtype else view


def _run_jit(inputs, outputs, stream: int, tactic: int) -> None:
    """The JIT implementation: the kernels.py pipeline on TensorRT's stream, written into the plugin output."""
    import torch

    from .kernels import moe_triton

    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        hidden, selected, scores, gate_w, up_w, down_w = (_as_torch(t) for t in inputs)
        out = _as_torch(outputs[0])
        if hidden.shape[0] == 0:
            return
        cfg = tile_config(tactic, hidden.shape[0], selected.shape[1], gate_w.shape[0], hidden.dtype)
        # moe_triton allocates its result: one (T, H) device copy, cheap next to the GEMMs.
        out.copy_(moe_triton(hidden, selected, scores, gate_w, up_w, down_w, config=cfg))


def _spec_from_desc(desc) -> TensorSpec:
    """TensorSpec of a `trtp.TensorDesc`: build-time-constant dims as ints, the rest unknown. Outside a
    shape context TensorRT hands out "fake" shape expressions (dtype and rank only)."""
    dims = []
    for expr in desc.shape_expr:
        try:
            dims.append(None if expr.is_fake or not expr.is_constant else int(expr.constant_value()))
        except (RuntimeError, AttributeError):
            dims.append(None)
    return TensorSpec(tuple(dims), schema.dtype_name(desc.dtype))


# ================================================================================================
# Registration with tensorrt.plugin
# ================================================================================================
_STATE = {"register": False, "autotune": False, "jit": False, "aot": False}


def registered() -> dict:
    """Which parts are registered in this process: {"register", "autotune", "jit", "aot"} -> bool."""
    return dict(_STATE)


def register_plugin(*, jit: bool = True, aot: bool = False) -> dict:
    """Register `hidream::HiDreamMoE` with TensorRT's plugin registry (idempotent; call before parsing an
    ONNX model with HiDreamMoE nodes AND before deserializing an engine that contains a JIT plugin).

    jit: the `@trtp.impl` Python callback (Triton kernels via torch). aot: the `@trtp.aot_impl` PTX kernel.
    When both are registered, the network must say which to use (NetworkDefinitionCreationFlag
    PREFER_JIT_PYTHON_PLUGINS / PREFER_AOT_PYTHON_PLUGINS, or a node attribute `aot`), else creation fails:
    `hidream_export.build.trt` sets the flag from the build plan.

    Raises PluginRegistrationError when tensorrt.plugin (or, for aot, its AOT support) is missing."""
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise PluginRegistrationError(
            f"cannot register the {schema.PLUGIN_ID} TensorRT plugin: tensorrt.plugin is not importable ({exc}); "
            "install TensorRT >= 10.8 (pip install 'hidream-export[gpu]')") from exc
    if aot and not hasattr(trtp, "aot_impl"):
        raise PluginRegistrationError(f"this TensorRT ({_trt_version()}) has no tensorrt.plugin.aot_impl; the AOT "
                                      f"{schema.PLUGIN_ID} needs TensorRT >= 10.9")
    if aot and aot_kernel.triton is None:
        raise PluginRegistrationError("the AOT plugin compiles a Triton kernel: pip install 'hidream-export[kernels]'")

    TensorDesc, Tensor = trtp.TensorDesc, trtp.Tensor

    if not _STATE["register"]:
        @trtp.register(schema.PLUGIN_ID)
        def _hidream_moe_desc(hidden_states: TensorDesc, selected_experts: TensorDesc, scores: TensorDesc,
                              gate_weights: TensorDesc, up_weights: TensorDesc, down_weights: TensorDesc,
                              top_k: int, num_experts: int) -> TensorDesc:
            descs = (hidden_states, selected_experts, scores, gate_weights, up_weights, down_weights)
            moe_output_desc([_spec_from_desc(d) for d in descs], top_k=top_k, num_experts=num_experts)
            return hidden_states.like()  # (T, H) in the activation dtype, same symbolic T as the input

        _STATE["register"] = True

    if not _STATE["autotune"]:
        @trtp.autotune(schema.PLUGIN_ID)
        def _hidream_moe_autotune(hidden_states: TensorDesc, selected_experts: TensorDesc, scores: TensorDesc,
                                  gate_weights: TensorDesc, up_weights: TensorDesc, down_weights: TensorDesc,
                                  top_k: int, num_experts: int,
                                  outputs: Tuple[TensorDesc]) -> List[trtp.AutoTuneCombination]:
            return [trtp.AutoTuneCombination(c.io_types, c.layouts, list(c.tactics))
                    for c in moe_autotune_combinations()]

        _STATE["autotune"] = True

    if jit and not _STATE["jit"]:
        @trtp.impl(schema.PLUGIN_ID)
        def _hidream_moe_impl(hidden_states: Tensor, selected_experts: Tensor, scores: Tensor,
                              gate_weights: Tensor, up_weights: Tensor, down_weights: Tensor,
                              top_k: int, num_experts: int, outputs: Tuple[Tensor], stream: int,
                              tactic: int) -> None:
            _run_jit((hidden_states, selected_experts, scores, gate_weights, up_weights, down_weights),
                     outputs, stream, tactic)

        _STATE["jit"] = True

    if aot and not _STATE["aot"]:
        @trtp.aot_impl(schema.PLUGIN_ID)
        def _hidream_moe_aot(hidden_states: TensorDesc, selected_experts: TensorDesc, scores: TensorDesc,
                             gate_weights: TensorDesc, up_weights: TensorDesc, down_weights: TensorDesc,
                             top_k: int, num_experts: int, outputs: Tuple[TensorDesc], tactic: int
                             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                        trtp.SymIntExprs]:
            kernel = aot_kernel.compile_aot_kernel(hidden_states.dtype, top_k, num_experts, tactic)
            tokens, hidden = hidden_states.shape_expr[0], hidden_states.shape_expr[1]
            inter = gate_weights.shape_expr[2]
            grid_x, scalars = aot_kernel.aot_launch_args(tokens, hidden, inter, kernel.block_m, kernel.block_n, cdiv=trtp.cdiv)
            launch = trtp.KernelLaunchParams()
            launch.grid_x = grid_x
            launch.block_x = kernel.num_warps * 32
            launch.shared_mem = kernel.shared_mem
            extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])
            return kernel.name.encode(), kernel.ptx.encode(), launch, extra

        _STATE["aot"] = True

    return {"plugin": schema.PLUGIN_ID, "version": schema.PLUGIN_VERSION, **registered()}


def _trt_version() -> str:
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:  # pragma: no cover
        return "not installed"
