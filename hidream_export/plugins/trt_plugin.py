"""The TensorRT plugin `hidream::HiDreamMoE`, as a Python "quickly deployable plugin" (`tensorrt.plugin`).

The op contract (inputs, attributes, shapes) is `schema.py`; this module only says how TensorRT runs it.

Two layers, so that everything except the TensorRT glue is testable on a machine without TensorRT:

* Plain Python (no tensorrt, no torch): the shape/type function `moe_output_desc` (and its parts
  `moe_output_shape`, `moe_output_dtype`), the type/format combinations `moe_autotune_combinations`, the
  tactic tables `JIT_TACTICS` / `AOT_TACTICS`, and the AOT kernel compiler `compile_aot_kernel` (needs
  Triton only). Tests call these directly.
* `register_plugin()`: imports `tensorrt.plugin` and registers thin decorated wrappers around the plain
  functions (`@trtp.register`, `@trtp.autotune`, `@trtp.impl`, `@trtp.aot_impl`). Nothing TensorRT-related
  happens at import time, so importing this module never needs TensorRT.

Why there are two implementations:

* JIT (`@trtp.impl`, the default): a Python callback at inference time that runs the Triton grouped-GEMM
  pipeline of `moe_triton.py` (sort/pad by expert -> gate/up GEMM + SwiGLU -> down GEMM -> weighted combine)
  through torch on TensorRT's stream. Fast, but the engine then needs Python + torch + Triton at runtime.
* AOT (`@trtp.aot_impl`): the documented QDP AOT contract is ONE precompiled kernel launch per plugin
  call, with scalar int32 arguments and no workspace (kernel name + PTX + launch params + symbolic int
  args; the kernel is baked into the engine, which then runs in plain C++/trtexec). The JIT pipeline needs
  four launches and temporary buffers, so it cannot be expressed that way. The AOT path therefore uses a
  separate single-launch kernel, `_moe_rows_kernel` below: each program owns a tile of tokens x output
  columns and loops over the experts its tokens selected, recomputing the gate/up activations for every
  output-column tile. It is exact (fp32 accumulation, same maths as the reference) but spends
  hidden/BLOCK_N times the gate/up FLOPs: a portability path for Python-free deployment, not the fast
  path. A C++ IPluginV3 with a workspace (schema.py's contract, moe_triton's pipeline) is what would make
  a Python-free engine fast. Two adjustments make Triton's output fit the AOT launch: the implicit scratch
  pointer parameters Triton appends (unused) are removed from the PTX entry, so its parameters are exactly
  inputs, int32 scalars, output; and the PTX ISA is pinned to the oldest the architecture allows (8.0 for
  sm_90), since the driver JIT-compiles the PTX when the engine loads and rejects a newer ISA.

Write no `from __future__ import annotations` here: `tensorrt.plugin` inspects the annotation objects of
the decorated functions (`issubclass(param.annotation, TensorDesc)`), and string annotations break that.
"""

import dataclasses
import os
import re
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from . import schema

try:  # Triton is optional: only the AOT kernel and the JIT path need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = [
    "PLUGIN_ID", "PLUGIN_NAME", "PLUGIN_NAMESPACE", "PLUGIN_VERSION",
    "ACTIVATION_TYPES", "TensorSpec", "canonical_dtype",
    "moe_output_shape", "moe_output_dtype", "moe_output_desc",
    "Tactic", "JIT_TACTICS", "AOT_TACTICS", "tile_config",
    "AutotuneCombination", "moe_autotune_combinations",
    "AotKernel", "compile_aot_kernel", "aot_launch_args", "moe_experts_aot_reference",
    "register_plugin", "registered", "PluginRegistrationError",
]

PLUGIN_NAME = schema.OP_TYPE
PLUGIN_NAMESPACE = schema.PLUGIN_NAMESPACE
PLUGIN_VERSION = schema.PLUGIN_VERSION  # tensorrt.plugin creators are always version "1"
PLUGIN_ID = schema.PLUGIN_ID
NUM_INPUTS = len(schema.INPUT_NAMES)
SELECTED_INDEX = schema.INPUT_NAMES.index("selected_experts")

# TensorRT type names as AutoTuneCombination spells them. Activations (hidden states, scores, the three
# weight stacks and the output) share one of these; the expert ids are always INT32.
ACTIVATION_TYPES = ("FP32", "FP16", "BF16")
INDEX_TYPE = "INT32"


class PluginRegistrationError(ImportError):
    """`register_plugin()` cannot run here (no TensorRT with `tensorrt.plugin`, or no AOT support)."""


# ================================================================================================
# Shape / type function (plain Python)
# ================================================================================================
_DTYPE_NAMES = {
    # canonical: accepted spellings (numpy, torch, onnx, TensorRT enum names, AutoTuneCombination)
    "FP32": ("fp32", "float32", "float", "torch.float32", "tensor(float)", "kfloat"),
    "FP16": ("fp16", "float16", "half", "torch.float16", "tensor(float16)", "khalf"),
    "BF16": ("bf16", "bfloat16", "torch.bfloat16", "tensor(bfloat16)", "kbf16"),
    "INT32": ("int32", "torch.int32", "tensor(int32)", "kint32"),
    "INT64": ("int64", "torch.int64", "tensor(int64)", "kint64"),
}
_DTYPE_LOOKUP = {alias: canon for canon, aliases in _DTYPE_NAMES.items() for alias in (canon.lower(), *aliases)}


def canonical_dtype(dtype) -> str:
    """'FP32' | 'FP16' | 'BF16' | 'INT32' | 'INT64' from any usual spelling: a string ('float16', 'bf16'),
    a numpy/torch dtype, or a TensorRT DataType (its enum name, e.g. DataType.HALF)."""
    name = getattr(dtype, "name", None)  # TensorRT enums (DataType.HALF) and numpy dtypes
    for candidate in (name, str(dtype)):
        if isinstance(candidate, str):
            key = candidate.strip().lower().removeprefix("datatype.")
            if key in _DTYPE_LOOKUP:
                return _DTYPE_LOOKUP[key]
    raise ValueError(f"{schema.OP_TYPE}: unsupported data type {dtype!r}")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What the shape/type function sees of one tensor: its dims (int, or None when not known at build
    time: a dynamic dimension) and its dtype (canonical name)."""

    shape: Tuple[Optional[int], ...]
    dtype: str

    @classmethod
    def of(cls, value) -> "TensorSpec":
        if isinstance(value, TensorSpec):
            return value
        shape, dtype = value
        return cls(tuple(None if d is None else int(d) for d in shape), canonical_dtype(dtype))


def _dims(shape: Sequence[Optional[int]]) -> tuple:
    return tuple(schema.AnyDim() if d is None else int(d) for d in shape)


def moe_output_shape(input_shapes: Sequence[Sequence[Optional[int]]]) -> Tuple[Optional[int], Optional[int]]:
    """Output shape (T, H) from the six input shapes, checked against each other by `schema.infer_shapes`
    (ValueError naming the input on a mismatch). None marks a dimension unknown until runtime."""
    if len(input_shapes) != NUM_INPUTS:
        raise ValueError(f"{schema.OP_TYPE}: takes {NUM_INPUTS} inputs {schema.INPUT_NAMES}, got {len(input_shapes)}")
    shapes = schema.infer_shapes(*(_dims(s) for s in input_shapes))
    known = lambda d: None if isinstance(d, schema.AnyDim) else d  # noqa: E731
    return known(shapes.tokens), known(shapes.hidden)


def moe_output_dtype(input_dtypes: Sequence) -> str:
    """Output dtype: the activation dtype. selected_experts must be INT32 (the contract, and TensorRT
    plugins get no implicit casts); every other input must share one of ACTIVATION_TYPES."""
    if len(input_dtypes) != NUM_INPUTS:
        raise ValueError(f"{schema.OP_TYPE}: takes {NUM_INPUTS} inputs {schema.INPUT_NAMES}, got {len(input_dtypes)}")
    dtypes = [canonical_dtype(d) for d in input_dtypes]
    if dtypes[SELECTED_INDEX] != INDEX_TYPE:
        raise ValueError(f"{schema.OP_TYPE}: selected_experts must be INT32, got {dtypes[SELECTED_INDEX]}")
    act = dtypes[0]
    if act not in ACTIVATION_TYPES:
        raise ValueError(f"{schema.OP_TYPE}: hidden_states must be one of {ACTIVATION_TYPES}, got {act}")
    for name, dtype in zip(schema.INPUT_NAMES, dtypes):
        if name != "selected_experts" and dtype != act:
            raise ValueError(f"{schema.OP_TYPE}: {name} is {dtype}, hidden_states is {act} (one activation type)")
    return act


def moe_output_desc(inputs: Sequence, *, top_k: Optional[int] = None,
                    num_experts: Optional[int] = None) -> TensorSpec:
    """The plugin's shape/type function: six input TensorSpecs (or (shape, dtype) pairs) -> the output's.

    `top_k` / `num_experts` are the node attributes; when given they must agree with the known dims of
    selected_experts and the weight stacks (the parser passes them on as plugin fields, so a mismatch
    would otherwise only show as wrong results)."""
    specs = [TensorSpec.of(x) for x in inputs]
    tokens, hidden = moe_output_shape([s.shape for s in specs])
    dtype = moe_output_dtype([s.dtype for s in specs])
    k_dim = specs[SELECTED_INDEX].shape[1]
    e_dim = specs[3].shape[0]
    if top_k is not None and k_dim is not None and int(top_k) != k_dim:
        raise ValueError(f"{schema.OP_TYPE}: attribute top_k={top_k} but selected_experts has {k_dim} columns")
    if num_experts is not None and e_dim is not None and int(num_experts) != e_dim:
        raise ValueError(f"{schema.OP_TYPE}: attribute num_experts={num_experts} but gate_weights stacks {e_dim} experts")
    if top_k is not None and num_experts is not None and not 1 <= int(top_k) <= int(num_experts):
        raise ValueError(f"{schema.OP_TYPE}: top_k={top_k} must be in [1, num_experts={num_experts}]")
    return TensorSpec((tokens, hidden), dtype)


# ================================================================================================
# Tactics and type/format combinations (plain Python)
# ================================================================================================
@dataclasses.dataclass(frozen=True)
class Tactic:
    """A custom tactic TensorRT times during the build (ids must be positive integers).

    `tile`: MoETileConfig keyword arguments for the JIT pipeline (None: `moe_triton.default_config`, which
    re-picks tiles from each call's token count, the right choice when one engine serves many sizes), or
    the block sizes of the single-launch AOT kernel."""

    id: int
    name: str
    tile: Optional[dict]


JIT_TACTICS: Tuple[Tactic, ...] = (
    Tactic(1, "heuristic", None),
    Tactic(2, "m16n64k64", {"block_m": 16, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}),
    Tactic(3, "m64n128k32", {"block_m": 64, "block_n": 128, "block_k": 32, "num_warps": 8, "num_stages": 3}),
    Tactic(4, "m128n128k32", {"block_m": 128, "block_n": 128, "block_k": 32, "num_warps": 8, "num_stages": 3}),
)
# Single-launch kernel: BLOCK_N output columns per program (larger = fewer gate/up recomputations),
# BLOCK_I intermediate columns per step. Kept small enough for <= 48 KiB of shared memory (checked by
# compile_aot_kernel), because nothing says the AOT launcher raises the dynamic shared-memory limit.
AOT_TACTICS: Tuple[Tactic, ...] = (
    Tactic(1, "rows32_n128", {"block_m": 32, "block_n": 128, "block_i": 64, "block_k": 32, "num_warps": 4, "num_stages": 2}),
    Tactic(2, "rows64_n128", {"block_m": 64, "block_n": 128, "block_i": 32, "block_k": 32, "num_warps": 8, "num_stages": 2}),
    Tactic(3, "rows16_n256", {"block_m": 16, "block_n": 256, "block_i": 32, "block_k": 32, "num_warps": 4, "num_stages": 2}),
    Tactic(4, "rows64_n64", {"block_m": 64, "block_n": 64, "block_i": 64, "block_k": 32, "num_warps": 4, "num_stages": 2}),
)
TACTIC_IDS = tuple(t.id for t in JIT_TACTICS)
assert TACTIC_IDS == tuple(t.id for t in AOT_TACTICS), "JIT and AOT advertise the same tactic ids"


def _tactic(table: Sequence[Tactic], tactic: int) -> Tactic:
    for t in table:
        if t.id == int(tactic):
            return t
    # Tactic 0 is TensorRT's "default"; it is passed when no custom tactic was timed (e.g. autotune absent).
    return table[0]


def tile_config(tactic: int, tokens: int, top_k: int, num_experts: int, dtype):
    """The MoETileConfig a JIT tactic runs with (imports the Triton kernels module, hence torch).

    fp32 tiles get a shorter K step and two stages, like moe_triton.default_config, so a fixed tactic
    still fits shared memory on sm_80..sm_90."""
    import torch

    from .moe_triton import MoETileConfig, default_config

    t = _tactic(JIT_TACTICS, tactic)
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


def moe_autotune_combinations(dtypes: Iterable[str] = ACTIVATION_TYPES,
                              tactics: Optional[Iterable[int]] = None) -> List[AutotuneCombination]:
    """The plugin's supported type/format combinations: every activation I/O in one of `dtypes` (all the
    same), expert ids INT32, linear layouts; each with the custom tactics (tile configs) to time."""
    options = "|".join(canonical_dtype(d) for d in dtypes)
    act_positions = [i for i in range(NUM_INPUTS + 1) if i != SELECTED_INDEX]
    types = [INDEX_TYPE if i == SELECTED_INDEX else options for i in range(NUM_INPUTS + 1)]
    assert len(act_positions) == NUM_INPUTS
    return [AutotuneCombination(", ".join(types), "LINEAR", tuple(tactics) if tactics is not None else TACTIC_IDS)]


# ================================================================================================
# The single-launch kernel of the AOT implementation
# ================================================================================================
if triton is not None:

    @triton.jit
    def _moe_rows_kernel(
        x_ptr, sel_ptr, scores_ptr, gate_ptr, up_ptr, down_ptr,  # the six plugin inputs, in order
        tokens, hidden, inter,  # int32 scalars: TensorRT passes them between the inputs and the outputs
        out_ptr,  # the plugin output
        TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """out[rows, cols] = sum_e w_e[row] * (silu(x @ gate_e) * (x @ up_e)) @ down_e[:, cols], one program
        per (BLOCK_M tokens, BLOCK_N output columns) tile, all contiguous tensors.

        w_e[row] is the routing score of expert e for the row (0 when not selected); experts no row of the
        tile selected are skipped. The SwiGLU activation is rounded once to the weight dtype (as in the
        JIT kernels) and everything else accumulates in fp32."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(hidden, BLOCK_N)
        pid_m = pid // num_n
        pid_n = pid % num_n
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < tokens
        rows64 = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < hidden
        ks = tl.arange(0, BLOCK_K)
        js = tl.arange(0, BLOCK_I)
        hidden64 = hidden.to(tl.int64)
        inter64 = inter.to(tl.int64)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e in range(NUM_EXPERTS):
            weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
            hit = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for j in tl.static_range(TOP_K):
                sel = tl.load(sel_ptr + rows64 * TOP_K + j, mask=row_ok, other=-1)
                score = tl.load(scores_ptr + rows64 * TOP_K + j, mask=row_ok, other=0.0).to(tl.float32)
                chosen = sel == e
                weight += tl.where(chosen, score, 0.0)
                hit += chosen.to(tl.int32)
            if tl.sum(hit, axis=0) > 0:
                uses = hit > 0
                expert_off = e * hidden64 * inter64  # gate/up (E, H, I) and down (E, I, H) hold H*I per expert
                acc_e = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for i0 in range(0, inter, BLOCK_I):
                    icols = i0 + js
                    i_ok = icols < inter
                    acc_g = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
                    acc_u = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
                    for k0 in range(0, hidden, BLOCK_K):
                        kk = k0 + ks
                        k_ok = kk < hidden
                        a = tl.load(x_ptr + rows64[:, None] * hidden64 + kk[None, :],
                                    mask=(row_ok & uses)[:, None] & k_ok[None, :], other=0.0)
                        w_off = expert_off + kk.to(tl.int64)[:, None] * inter64 + icols[None, :]
                        w_mask = k_ok[:, None] & i_ok[None, :]
                        g = tl.load(gate_ptr + w_off, mask=w_mask, other=0.0)
                        u = tl.load(up_ptr + w_off, mask=w_mask, other=0.0)
                        if UPCAST_DOT:
                            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
                        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
                        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
                    act = (acc_g * tl.sigmoid(acc_g) * acc_u).to(down_ptr.dtype.element_ty)
                    d = tl.load(down_ptr + expert_off + icols.to(tl.int64)[:, None] * hidden64 + cols[None, :],
                                mask=i_ok[:, None] & col_ok[None, :], other=0.0)
                    if UPCAST_DOT:
                        act, d = act.to(tl.float32), d.to(tl.float32)
                    acc_e = tl.dot(act, d, acc_e, input_precision=DOT_PRECISION)
                acc += weight[:, None] * acc_e
        out_ptrs = out_ptr + rows64[:, None] * hidden64 + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_TRITON_TYPES = {"FP32": "fp32", "FP16": "fp16", "BF16": "bf16"}


def _aot_constexprs(dtype: str, top_k: int, num_experts: int, tactic: int, *, interpret: bool = False) -> dict:
    tile = _tactic(AOT_TACTICS, tactic).tile
    block_k = 16 if dtype == "FP32" else tile["block_k"]
    return {"TOP_K": int(top_k), "NUM_EXPERTS": int(num_experts), "BLOCK_M": tile["block_m"],
            "BLOCK_N": tile["block_n"], "BLOCK_I": tile["block_i"], "BLOCK_K": block_k,
            # fp32 uses IEEE products: TF32 would break agreement with the reference (~1e-3 relative)
            "DOT_PRECISION": "ieee" if dtype == "FP32" else "tf32",
            # Triton's CPU interpreter multiplies bf16 tiles as raw bits; upcast there only.
            "UPCAST_DOT": bool(interpret and dtype == "BF16")}


@dataclasses.dataclass(frozen=True)
class AotKernel:
    """A compiled AOT kernel: what `@trtp.aot_impl` hands TensorRT, plus facts to check it against."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    target: str
    constexprs: dict
    block_m: int
    block_n: int
    dropped_params: int  # implicit trailing (scratch) parameters removed from the PTX entry, see below


# PTX ISA version per SM architecture for the AOT kernel: the oldest that supports the architecture,
# because the driver JIT-compiles the PTX at engine load and refuses an ISA newer than it knows. Triton's
# own default follows its bundled ptxas (PTX 9.x with Triton 3.9), which needs a CUDA 13 driver.
_AOT_PTX_VERSION = {80: 78, 86: 78, 87: 78, 89: 78, 90: 80}


_AOT_CACHE: dict = {}


def compile_aot_kernel(dtype, top_k: int, num_experts: int, tactic: int = 1, target=None,
                       ptx_version: Optional[int] = None) -> AotKernel:
    """Compile `_moe_rows_kernel` for one (activation dtype, top_k, num_experts, tactic) to PTX with Triton.

    `target`: a `triton.backends.compiler.GPUTarget`, or "sm90"-style string; default the active GPU when
    there is one, else sm_90 (compiling needs no GPU: Triton ships LLVM and ptxas). `ptx_version` (e.g. 80
    for ISA 8.0): default the oldest ISA for the architecture (see _AOT_PTX_VERSION), overridable with the
    HIDREAM_AOT_PTX_VERSION environment variable. Raises RuntimeError if the kernel needs global scratch
    memory or more than 48 KiB of shared memory, which the AOT launch contract does not provide for."""
    if triton is None:
        raise PluginRegistrationError("the AOT implementation needs Triton: pip install 'hidream-export[kernels]'")
    from triton.backends.compiler import GPUTarget

    act = canonical_dtype(dtype)
    if act not in _TRITON_TYPES:
        raise ValueError(f"{schema.OP_TYPE}: AOT kernel for {ACTIVATION_TYPES}, not {act}")
    if target is None:
        try:
            target = triton.runtime.driver.active.get_current_target()
        except Exception:  # noqa: BLE001 - no GPU/driver here: compile for Hopper
            target = GPUTarget("cuda", 90, 32)
    elif isinstance(target, str):
        target = GPUTarget("cuda", int(target.lower().removeprefix("sm_").removeprefix("sm")), 32)
    ptx_version = ptx_version or int(os.environ.get("HIDREAM_AOT_PTX_VERSION", 0)) or _AOT_PTX_VERSION.get(target.arch)
    # TensorRT asks for the launch of every (type, format, tactic) it times: compile each kernel once.
    key = (act, int(top_k), int(num_experts), int(tactic), target.backend, target.arch, ptx_version)
    if key in _AOT_CACHE:
        return _AOT_CACHE[key]
    ty = _TRITON_TYPES[act]
    constexprs = _aot_constexprs(act, top_k, num_experts, tactic)
    signature = {"x_ptr": f"*{ty}", "sel_ptr": "*i32", "scores_ptr": f"*{ty}", "gate_ptr": f"*{ty}",
                 "up_ptr": f"*{ty}", "down_ptr": f"*{ty}", "tokens": "i32", "hidden": "i32", "inter": "i32",
                 "out_ptr": f"*{ty}", **{name: "constexpr" for name in constexprs}}
    tile = _tactic(AOT_TACTICS, tactic).tile
    options = {"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]}
    if ptx_version:
        options["ptx_version"] = int(ptx_version)
    src = triton.compiler.ASTSource(fn=_moe_rows_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=target, options=options)
    meta = compiled.metadata
    scratch = int(getattr(meta, "global_scratch_size", 0) or 0) + int(getattr(meta, "profile_scratch_size", 0) or 0)
    if scratch:
        raise RuntimeError(f"{schema.OP_TYPE} AOT kernel needs {scratch} B of global scratch memory, which the "
                           "tensorrt.plugin AOT launch does not provide")
    if meta.shared > 48 * 1024:
        raise RuntimeError(f"{schema.OP_TYPE} AOT kernel (tactic {tactic}, {act}) needs {meta.shared} B of shared "
                           "memory; keep AOT tiles under 48 KiB")
    ptx, dropped = _drop_unused_trailing_params(compiled.asm["ptx"], meta.name, AOT_KERNEL_PARAMS)
    kernel = AotKernel(name=meta.name, ptx=ptx, num_warps=meta.num_warps, shared_mem=meta.shared,
                       target=f"{target.backend}:{target.arch}", constexprs=constexprs, block_m=constexprs["BLOCK_M"],
                       block_n=constexprs["BLOCK_N"], dropped_params=dropped)
    _AOT_CACHE[key] = kernel
    return kernel


# What TensorRT passes to an AOT plugin kernel: the input pointers, the int32 extra args, the output
# pointers (tensorrt.plugin.aot_impl docs). Here 6 inputs + 3 ints + 1 output.
AOT_KERNEL_PARAMS = NUM_INPUTS + 3 + len(schema.OUTPUT_NAMES)


def _drop_unused_trailing_params(ptx: str, kernel: str, keep: int) -> Tuple[str, int]:
    """Remove the implicit parameters Triton appends after the declared ones (global/profile scratch
    pointers, unused when their sizes are 0) from the kernel's PTX entry, so the PTX signature is exactly
    what TensorRT's AOT launch passes. A parameter that the body reads is never removed (RuntimeError)."""
    match = re.search(r"\.entry\s+" + re.escape(kernel) + r"\s*\((.*?)\)", ptx, flags=re.S)
    if match is None:
        raise RuntimeError(f"no .entry {kernel} in the PTX Triton produced")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise RuntimeError(f"{kernel} declares {len(params)} parameters, the AOT launch passes {keep}")
    body = ptx[match.end():]
    extra = params[keep:]
    for param in extra:
        name = param.split()[-1]
        if re.search(r"\b" + re.escape(name) + r"\b", body):
            raise RuntimeError(f"{kernel}: implicit parameter {name} is used by the kernel; the AOT launch cannot "
                               "supply it")
    if not extra:
        return ptx, 0
    inner = ",\n".join("\t" + p for p in params[:keep])
    return ptx[:match.start(1)] + "\n" + inner + "\n" + ptx[match.end(1):], len(extra)


def aot_launch_args(tokens, hidden, inter, block_m: int, block_n: int, cdiv=None):
    """(grid_x, [int32 scalar args]) of one AOT launch. With `cdiv=trtp.cdiv` and ShapeExprs this builds
    TensorRT's symbolic launch; with ints it is the same arithmetic, for tests and `moe_experts_aot_reference`."""
    cdiv = cdiv or (lambda a, b: -(-a // b))
    return cdiv(tokens, block_m) * cdiv(hidden, block_n), [tokens, hidden, inter]


def moe_experts_aot_reference(hidden, selected_experts, scores, gate_w, up_w, down_w, tactic: int = 1):
    """Run the AOT kernel through Triton's launcher on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1),
    with exactly the arguments and grid the AOT launch uses. For tests: it checks the kernel's maths
    without TensorRT."""
    import torch

    if triton is None:
        raise PluginRegistrationError("needs Triton: pip install 'hidream-export[kernels]'")
    s = schema.infer_shapes(hidden.shape, selected_experts.shape, scores.shape, gate_w.shape, up_w.shape, down_w.shape)
    act = canonical_dtype(hidden.dtype)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    constexprs = _aot_constexprs(act, s.top_k, s.num_experts, tactic, interpret=interpret)
    tensors = [t.contiguous() for t in (hidden, selected_experts.to(torch.int32), scores, gate_w, up_w, down_w)]
    out = torch.empty((s.tokens, s.hidden), dtype=hidden.dtype, device=hidden.device)
    if s.tokens == 0:
        return out
    grid_x, scalars = aot_launch_args(s.tokens, s.hidden, s.intermediate, constexprs["BLOCK_M"], constexprs["BLOCK_N"])
    tile = _tactic(AOT_TACTICS, tactic).tile
    _moe_rows_kernel[(grid_x,)](*tensors, *scalars, out, **constexprs,
                                num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    return out


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

    dtype = canonical_dtype(tensor.dtype)
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
    """The JIT implementation: moe_triton's pipeline on TensorRT's stream, written into the plugin output."""
    import torch

    from .moe_triton import moe_experts_triton

    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        hidden, selected, scores, gate_w, up_w, down_w = (_as_torch(t) for t in inputs)
        out = _as_torch(outputs[0])
        if hidden.shape[0] == 0:
            return
        cfg = tile_config(tactic, hidden.shape[0], selected.shape[1], gate_w.shape[0], hidden.dtype)
        # moe_experts_triton allocates its result: one (T, H) device copy, cheap next to the GEMMs.
        out.copy_(moe_experts_triton(hidden, selected, scores, gate_w, up_w, down_w, config=cfg))


def _spec_from_desc(desc) -> TensorSpec:
    """TensorSpec of a `trtp.TensorDesc`: build-time-constant dims as ints, the rest unknown. Outside a
    shape context TensorRT hands out "fake" shape expressions (dtype and rank only)."""
    dims = []
    for expr in desc.shape_expr:
        try:
            dims.append(None if expr.is_fake or not expr.is_constant else int(expr.constant_value()))
        except (RuntimeError, AttributeError):
            dims.append(None)
    return TensorSpec(tuple(dims), canonical_dtype(desc.dtype))


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
            f"cannot register the {PLUGIN_ID} TensorRT plugin: tensorrt.plugin is not importable ({exc}); "
            "install TensorRT >= 10.8 (pip install 'hidream-export[gpu]')") from exc
    if aot and not hasattr(trtp, "aot_impl"):
        raise PluginRegistrationError(f"this TensorRT ({_trt_version()}) has no tensorrt.plugin.aot_impl; the AOT "
                                      f"{PLUGIN_ID} needs TensorRT >= 10.9")
    if aot and triton is None:
        raise PluginRegistrationError("the AOT plugin compiles a Triton kernel: pip install 'hidream-export[kernels]'")

    TensorDesc, Tensor = trtp.TensorDesc, trtp.Tensor

    if not _STATE["register"]:
        @trtp.register(PLUGIN_ID)
        def _hidream_moe_desc(hidden_states: TensorDesc, selected_experts: TensorDesc, scores: TensorDesc,
                              gate_weights: TensorDesc, up_weights: TensorDesc, down_weights: TensorDesc,
                              top_k: int, num_experts: int) -> TensorDesc:
            descs = (hidden_states, selected_experts, scores, gate_weights, up_weights, down_weights)
            moe_output_desc([_spec_from_desc(d) for d in descs], top_k=top_k, num_experts=num_experts)
            return hidden_states.like()  # (T, H) in the activation dtype, same symbolic T as the input

        _STATE["register"] = True

    if not _STATE["autotune"]:
        @trtp.autotune(PLUGIN_ID)
        def _hidream_moe_autotune(hidden_states: TensorDesc, selected_experts: TensorDesc, scores: TensorDesc,
                                  gate_weights: TensorDesc, up_weights: TensorDesc, down_weights: TensorDesc,
                                  top_k: int, num_experts: int,
                                  outputs: Tuple[TensorDesc]) -> List[trtp.AutoTuneCombination]:
            return [trtp.AutoTuneCombination(c.io_types, c.layouts, list(c.tactics))
                    for c in moe_autotune_combinations()]

        _STATE["autotune"] = True

    if jit and not _STATE["jit"]:
        @trtp.impl(PLUGIN_ID)
        def _hidream_moe_impl(hidden_states: Tensor, selected_experts: Tensor, scores: Tensor,
                              gate_weights: Tensor, up_weights: Tensor, down_weights: Tensor,
                              top_k: int, num_experts: int, outputs: Tuple[Tensor], stream: int,
                              tactic: int) -> None:
            _run_jit((hidden_states, selected_experts, scores, gate_weights, up_weights, down_weights),
                     outputs, stream, tactic)

        _STATE["jit"] = True

    if aot and not _STATE["aot"]:
        @trtp.aot_impl(PLUGIN_ID)
        def _hidream_moe_aot(hidden_states: TensorDesc, selected_experts: TensorDesc, scores: TensorDesc,
                             gate_weights: TensorDesc, up_weights: TensorDesc, down_weights: TensorDesc,
                             top_k: int, num_experts: int, outputs: Tuple[TensorDesc], tactic: int
                             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                        trtp.SymIntExprs]:
            kernel = compile_aot_kernel(hidden_states.dtype, top_k, num_experts, tactic)
            tokens, hidden = hidden_states.shape_expr[0], hidden_states.shape_expr[1]
            inter = gate_weights.shape_expr[2]
            grid_x, scalars = aot_launch_args(tokens, hidden, inter, kernel.block_m, kernel.block_n, cdiv=trtp.cdiv)
            launch = trtp.KernelLaunchParams()
            launch.grid_x = grid_x
            launch.block_x = kernel.num_warps * 32
            launch.shared_mem = kernel.shared_mem
            extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])
            return kernel.name.encode(), kernel.ptx.encode(), launch, extra

        _STATE["aot"] = True

    return {"plugin": PLUGIN_ID, "version": PLUGIN_VERSION, **registered()}


def _trt_version() -> str:
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:  # pragma: no cover
        return "not installed"
