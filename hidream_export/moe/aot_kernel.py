"""The single-launch HiDreamMoE kernel of the TensorRT plugin's AOT implementation, and its compiler.

The documented AOT contract of `tensorrt.plugin` is ONE precompiled kernel launch per plugin call, with
scalar int32 arguments and no workspace (kernel name + PTX + launch params + symbolic int args; the kernel
is baked into the engine, which then runs in plain C++/trtexec). The JIT pipeline (kernels.py) needs four
launches and temporary buffers, so it cannot be expressed that way. This kernel therefore stands alone:
each program owns a tile of tokens x output columns and loops over the experts its tokens selected,
recomputing the gate/up activations for every output-column tile. It is exact (fp32 accumulation, the
reference's maths) but spends hidden/BLOCK_N times the gate/up FLOPs: a portability path for Python-free
deployment, not the fast path. A C++ IPluginV3 with a workspace (the kernels.py pipeline) is what would
make a Python-free engine fast.

Two adjustments make Triton's output fit the AOT launch: the implicit scratch pointer parameters Triton
appends (unused) are removed from the PTX entry, so its parameters are exactly inputs, int32 scalars,
output; and the PTX ISA is pinned to the oldest the architecture allows (8.0 for sm_90), since the driver
JIT-compiles the PTX when the engine loads and rejects a newer ISA.

Compiling needs Triton but no GPU; running needs a GPU, or TRITON_INTERPRET=1 for CPU tensors (tests).
"""

from __future__ import annotations

import dataclasses
import os
import re

from hidream_export.errors import PluginRegistrationError

from . import schema
from .tactics import AOT_TACTICS, find_tactic

# Pinned as in kernels.py: the AOT kernel is validated with FP fusion on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:  # Triton is optional: the rest of the package works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = ["AotKernel", "AOT_KERNEL_PARAMS", "compile_aot_kernel", "aot_launch_args", "moe_aot_reference"]

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
    tile = find_tactic(AOT_TACTICS, tactic).tile
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
                       ptx_version: int | None = None) -> AotKernel:
    """Compile `_moe_rows_kernel` for one (activation dtype, top_k, num_experts, tactic) to PTX with Triton.

    `target`: a `triton.backends.compiler.GPUTarget`, or "sm90"-style string; default the active GPU when
    there is one, else sm_90 (compiling needs no GPU: Triton ships LLVM and ptxas). `ptx_version` (e.g. 80
    for ISA 8.0): default the oldest ISA for the architecture (see _AOT_PTX_VERSION), overridable with the
    HIDREAM_AOT_PTX_VERSION environment variable. Raises RuntimeError if the kernel needs global scratch
    memory or more than 48 KiB of shared memory, which the AOT launch contract does not provide for."""
    if triton is None:
        raise PluginRegistrationError("the AOT implementation needs Triton: pip install 'hidream-export[kernels]'")
    from triton.backends.compiler import GPUTarget

    act = schema.dtype_name(dtype)
    if act not in _TRITON_TYPES:
        raise ValueError(f"{schema.OP_TYPE}: AOT kernel for {schema.ACTIVATION_TYPES}, not {act}")
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
    tile = find_tactic(AOT_TACTICS, tactic).tile
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
AOT_KERNEL_PARAMS = len(schema.INPUT_NAMES) + 3 + len(schema.OUTPUT_NAMES)


def _drop_unused_trailing_params(ptx: str, kernel: str, keep: int) -> tuple[str, int]:
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
    TensorRT's symbolic launch; with ints it is the same arithmetic, for tests and `moe_aot_reference`."""
    cdiv = cdiv or (lambda a, b: -(-a // b))
    return cdiv(tokens, block_m) * cdiv(hidden, block_n), [tokens, hidden, inter]


def moe_aot_reference(hidden, selected_experts, scores, gate_w, up_w, down_w, tactic: int = 1):
    """Run the AOT kernel through Triton's launcher on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1),
    with exactly the arguments and grid the AOT launch uses. For tests: it checks the kernel's maths
    without TensorRT."""
    import torch

    if triton is None:
        raise PluginRegistrationError("needs Triton: pip install 'hidream-export[kernels]'")
    s = schema.check([tuple(t.shape) for t in (hidden, selected_experts, scores, gate_w, up_w, down_w)])
    act = schema.dtype_name(hidden.dtype)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    constexprs = _aot_constexprs(act, s.top_k, s.num_experts, tactic, interpret=interpret)
    tensors = [t.contiguous() for t in (hidden, selected_experts.to(torch.int32), scores, gate_w, up_w, down_w)]
    out = torch.empty((s.tokens, s.hidden), dtype=hidden.dtype, device=hidden.device)
    if s.tokens == 0:
        return out
    grid_x, scalars = aot_launch_args(s.tokens, s.hidden, s.intermediate, constexprs["BLOCK_M"], constexprs["BLOCK_N"])
    tile = find_tactic(AOT_TACTICS, tactic).tile
    _moe_rows_kernel[(grid_x,)](*tensors, *scalars, out, **constexprs,
                                num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    return out

