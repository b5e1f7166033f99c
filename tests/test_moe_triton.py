"""The `hidream::moe_experts` op, its Triton kernels and the model's `triton` MoE lowering.

Kernel tests need no GPU: they run in Triton's CPU interpreter. TRITON_INTERPRET=1 only takes effect if it
is set before the kernels are decorated, and it would leak into every later test in the same process, so
the interpreted (and the compile-only) checks run in ONE worker subprocess each: this file re-executed as a
script, which prints its measurements as JSON. The tests below hold the tolerances and assert on them, one
test per case. The pytest process itself never imports hidream_export.plugins.moe_triton (except in the
CUDA-only tests), so it stays free of interpreter state.

Tolerances (relative to max|reference|): fp32 1e-5; fp16 cosine >= 0.9999 and max abs error <= 4e-3;
bf16 cosine >= 0.999 and max abs error <= 3e-2. Low-precision oracles are computed in fp32 from the same
rounded inputs, so the bounds measure only the kernels' own roundings (intermediate, slot rows, output).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from hidream_export.errors import MoEContractError
from hidream_export.model import moe as model_moe_mod

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'hidream-export[kernels]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[1]
RESULT_MARK = "MOE_WORKER_RESULTS="

FP32_REL = 1e-5
LOW_PRECISION = {"float16": (0.9999, 4e-3), "bfloat16": (0.999, 3e-2)}  # (min cosine, max abs / max|ref|)


# ================================================================================================
# Shared case builders (used by the worker subprocess and by the in-process tests)
# ================================================================================================
def _case(name, T, E, k, routing, dtype="float32", H=32, I=64, block=(16, 16, 16), strided=False):
    return dict(name=name, T=T, E=E, k=k, routing=routing, dtype=dtype, H=H, I=I, block=block, strided=strided)


KERNEL_CASES = [
    _case("random_E4_k2_T37", 37, 4, 2, "random"),
    _case("random_E2_k1_T40", 40, 2, 1, "random"),
    _case("random_E2_k2_T16_exact_block", 16, 2, 2, "random"),
    _case("random_E4_k1_T1_single_token", 1, 4, 1, "random"),
    _case("all_on_one_E4_k2_T33", 33, 4, 2, "all_on_one"),
    _case("all_on_one_E2_k1_T40", 40, 2, 1, "all_on_one"),
    _case("one_empty_E4_k2_T29", 29, 4, 2, "one_empty"),
    _case("one_empty_E4_k1_T20", 20, 4, 1, "one_empty"),
    _case("one_empty_E2_k1_T23", 23, 2, 1, "one_empty"),
    _case("ragged_H24_I40_E4_k2_T21", 21, 4, 2, "random", H=24, I=40),
    _case("strided_weights_E4_k2_T19", 19, 4, 2, "random", strided=True),
    _case("block_m32_E4_k2_T37", 37, 4, 2, "random", block=(32, 32, 16)),
    _case("default_config_E4_k2_T40", 40, 4, 2, "random", block=None),
    _case("fp16_random_E4_k2_T37", 37, 4, 2, "random", dtype="float16"),
    _case("fp16_all_on_one_E2_k1_T40", 40, 2, 1, "all_on_one", dtype="float16"),
    _case("fp16_one_empty_E4_k2_T29", 29, 4, 2, "one_empty", dtype="float16"),
    _case("bf16_random_E4_k2_T37", 37, 4, 2, "random", dtype="bfloat16"),
]
ALIGN_CASES = [(37, 4, 2, "random", 16), (40, 2, 1, "all_on_one", 16), (29, 4, 2, "one_empty", 16),
               (1, 4, 1, "random", 16), (50, 4, 2, "random", 64)]


def make_routing(T: int, E: int, k: int, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) distinct expert ids (int64) and positive, not renormalised scores (T, k).

    random: k distinct experts per token. all_on_one: every token's first slot is expert 1 (the others
    random). one_empty: expert 0 is never picked."""
    rows = []
    for _ in range(T):
        if kind == "random":
            rows.append(torch.randperm(E, generator=gen)[:k])
        elif kind == "all_on_one":
            rest = torch.tensor([e for e in torch.randperm(E, generator=gen).tolist() if e != 1])
            rows.append(torch.cat([torch.tensor([1]), rest])[:k])
        elif kind == "one_empty":
            assert k < E
            rows.append(torch.randperm(E - 1, generator=gen)[:k] + 1)
        else:
            raise ValueError(kind)
    ids = torch.stack(rows).to(torch.int64).reshape(T, k)
    scores = torch.rand(T, k, generator=gen) * 0.9 + 0.05
    return ids, scores


def make_moe(H: int, I: int, E: int, k: int, seed: int = 0):
    """A MoEFeedForward with O(1) outputs (weights ~ N(0, 1/fan_in))."""
    from hidream_export.model.moe import MoEFeedForward

    torch.manual_seed(seed)
    moe = MoEFeedForward(H, I, 16, E, k)
    with torch.no_grad():
        for expert in moe.experts:
            for lin in (expert.w1, expert.w2, expert.w3):
                lin.weight.normal_(0, lin.weight.shape[1] ** -0.5)
    return moe


def kernel_inputs(case: dict, seed: int = 0):
    """Inputs in the case's dtype, and the fp32 oracle: the model's reference lowering (no shared expert)
    evaluated on exactly the rounded values the kernel sees."""
    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator().manual_seed(seed)
    T, H, I, E, k = case["T"], case["H"], case["I"], case["E"], case["k"]
    moe = make_moe(H, I, E, k, seed)
    ids, scores = make_routing(T, E, k, case["routing"], gen)
    x = torch.randn(T, H, generator=gen)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(p.to(dtype).float())
        x, scores = x.to(dtype).float(), scores.to(dtype).float()
        expected = model_moe_mod.MOE_LOWERINGS["reference"](moe, x, ids, scores)
        gate_w, up_w, down_w = (w.to(dtype) for w in moe.stacked_weights())
    if case["strided"]:  # same values, (E, I, H)-major storage: exercises the stride arguments
        gate_w, up_w = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (gate_w, up_w))
        down_w = down_w.transpose(1, 2).contiguous().transpose(1, 2)
        assert not gate_w.is_contiguous()
    args = (x.to(dtype), ids.to(torch.int32), scores.to(dtype), gate_w, up_w, down_w)
    return args, expected


def error_stats(got: torch.Tensor, expected: torch.Tensor) -> dict:
    got, expected = got.double().flatten(), expected.double().flatten()
    return {"max_abs": (got - expected).abs().max().item(), "ref_max": expected.abs().max().item(),
            "cosine": torch.nn.functional.cosine_similarity(got, expected, dim=0).item(),
            "finite": bool(torch.isfinite(got).all())}


def assert_close(stats: dict, dtype: str, what: str = "") -> None:
    assert stats["finite"], f"{what}: non-finite output"
    rel = stats["max_abs"] / stats["ref_max"]
    if dtype == "float32":
        assert rel <= FP32_REL, f"{what}: max abs error {rel:.3g} x max|ref| > {FP32_REL}"
    else:
        min_cos, max_rel = LOW_PRECISION[dtype]
        assert stats["cosine"] >= min_cos, f"{what}: cosine {stats['cosine']:.6f} < {min_cos}"
        assert rel <= max_rel, f"{what}: max abs error {rel:.3g} x max|ref| > {max_rel}"


def tiny_transformer_inputs(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 8, 8, generator=gen), torch.tensor([10.0, 500.0])[:batch],
            torch.randn(batch, 8, 32, generator=gen), torch.randn(3, batch, 8, 24, generator=gen),
            torch.randn(batch, 32, generator=gen))


# ================================================================================================
# Worker subprocess (python tests/test_moe_triton.py interpret|compile)
# ================================================================================================
def _guard(fn):
    try:
        return fn()
    except Exception:  # reported to the parent test, which fails with the traceback
        return {"error": traceback.format_exc()}


def _worker_interpret() -> dict:
    from hidream_export.model import HiDreamTransformer
    from hidream_export.model import moe as model_moe
    from hidream_export.moe import kernels as moe_triton

    results = {"interpreting": moe_triton.interpreting()}

    def run_kernel_case(case):
        args, expected = kernel_inputs(case)
        cfg = None if case["block"] is None else moe_triton.MoETileConfig(*case["block"])
        got = moe_triton.moe_triton(*args, config=cfg)
        assert got.dtype == args[0].dtype and got.shape == args[0].shape
        return error_stats(got, expected)

    for case in KERNEL_CASES:
        results[f"kernel:{case['name']}"] = _guard(lambda: run_kernel_case(case))

    def run_align_case(T, E, k, kind, block_m):
        ids, _ = make_routing(T, E, k, kind, torch.Generator().manual_seed(1))
        a = moe_triton.align_by_expert(ids.to(torch.int32), E, block_m)
        flat = ids.flatten()
        n = flat.numel()
        assert a.max_rows == n + E * (block_m - 1), "worst-case buffer size"
        used = int(a.num_padded.item())
        counts = torch.bincount(flat, minlength=E)
        assert used == int(((counts + block_m - 1) // block_m * block_m).sum()), "padded row count"
        assert used % block_m == 0
        pairs = a.sorted_pairs.long()
        assert (pairs[used:] == n).all(), "unused tail must be sentinel"
        real = pairs[pairs < n]
        assert torch.equal(real.sort().values, torch.arange(n)), "every (token, slot) pair exactly once"
        row_expert = a.block_experts.long().repeat_interleave(block_m)[:a.max_rows]
        ok = pairs < n
        assert torch.equal(row_expert[ok], flat[pairs[ok]]), "each row's tile belongs to the pair's expert"
        assert (a.block_experts[used // block_m:] == -1).all() and (a.block_experts[:used // block_m] >= 0).all()
        # Within an expert, rows stay in (token, slot) order (stable sort).
        for e in range(E):
            mine = pairs[ok & (row_expert == e)]
            assert torch.equal(mine, mine.sort().values)
        return {"ok": True}

    for T, E, k, kind, block_m in ALIGN_CASES:
        results[f"align:{T}_{E}_{k}_{kind}_{block_m}"] = _guard(lambda: run_align_case(T, E, k, kind, block_m))

    def run_tiny_transformer():
        """The whole tiny model with its 4 MoE layers through the interpreted kernels vs the reference."""
        cfg = moe_triton.MoETileConfig(block_m=16, block_n=64, block_k=32)

        def kernels(moe, x, idx, w):
            w1, w3, w2 = (t.detach() for t in moe.stacked_weights())
            return moe_triton.moe_triton(x, idx.to(torch.int32), w, w1, w3, w2, config=cfg)

        model_moe.MOE_LOWERINGS["plugin"] = kernels  # this worker process only: the interpreted kernels
        torch.manual_seed(0)
        model = HiDreamTransformer("tiny").eval()
        inputs = tiny_transformer_inputs()
        with torch.no_grad():
            expected = model(*inputs)
            got = model.set_moe_lowering("plugin")(*inputs)
        return error_stats(got, expected)

    results["tiny_transformer"] = _guard(run_tiny_transformer)
    return results


def _worker_compile() -> dict:
    """Compile the kernels to cubin for sm_80 and sm_90 without a GPU: catches errors the interpreter
    does not (type promotion, constexpr use, tl.dot shape rules) and shows which MMA each arch uses."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hidream_export.moe import kernels as moe_triton

    if moe_triton.interpreting():
        return {"skip": "kernels are interpreted in this process (TRITON_INTERPRET is set)"}
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        return {"skip": f"triton {triton.__version__}: ASTSource takes no constexprs argument (older API)"}
    int_ptrs = {"sorted_pairs_ptr", "block_experts_ptr", "num_padded_ptr"}

    def build(kernel, dtype, constexprs, arch):
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*i32" if name in int_ptrs else f"*{dtype}"
            else:
                sig[name] = "i32"
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})

    results = {}
    for arch in (80, 90):
        for dtype in ("fp16", "bf16", "fp32"):
            def one():
                tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8,
                             DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST_DOT=False)
                gate_up = build(moe_triton._gate_up_swiglu_kernel, dtype, dict(TOP_K=2, **tiles), arch)
                build(moe_triton._down_kernel, dtype, tiles, arch)
                build(moe_triton._combine_kernel, dtype, dict(TOP_K=2, BLOCK_H=128), arch)
                ptx = gate_up.asm["ptx"]
                return {"ok": True, "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx}
            results[f"sm{arch}_{dtype}"] = _guard(one)
    return results


def _run_worker(mode: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if mode == "interpret":
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{mode} worker failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def _result(results: dict, key: str) -> dict:
    res = results[key]
    if "error" in res:
        pytest.fail(f"{key} raised in the worker:\n{res['error']}")
    return res


# ================================================================================================
# Kernel tests (Triton interpreter on CPU, in the worker)
# ================================================================================================
@pytest.fixture(scope="module")
def interpreted():
    results = _run_worker("interpret")
    assert results["interpreting"], "the worker's kernels were not built for the interpreter"
    return results


@needs_triton
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c["name"] for c in KERNEL_CASES])
def test_kernels_match_reference_interpreted(interpreted, case):
    stats = _result(interpreted, f"kernel:{case['name']}")
    assert_close(stats, case["dtype"], case["name"])


@needs_triton
@pytest.mark.parametrize("T,E,k,kind,block_m", ALIGN_CASES)
def test_align_layout_invariants(interpreted, T, E, k, kind, block_m):
    _result(interpreted, f"align:{T}_{E}_{k}_{kind}_{block_m}")


@needs_triton
def test_tiny_transformer_through_interpreted_kernels(interpreted):
    assert_close(_result(interpreted, "tiny_transformer"), "float32", "tiny transformer")


@needs_triton
def test_kernels_compile_for_sm80_and_sm90():
    results = _run_worker("compile")
    if "skip" in results:
        pytest.skip(results["skip"])
    for arch in (80, 90):
        for dtype in ("fp16", "bf16", "fp32"):
            res = _result(results, f"sm{arch}_{dtype}")
            if dtype != "fp32":  # fp16/bf16 GEMMs must land on tensor cores (wgmma on Hopper)
                assert res["wgmma"] if arch == 90 else res["mma_sync"], (arch, dtype, res)


# ================================================================================================
# The torch.library op (CPU reference kernel, fake kernel) and the `plugin` lowering
# ================================================================================================
@pytest.fixture(scope="module")
def moe_op():
    from hidream_export.moe import torch_op

    return torch_op


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c["name"] for c in KERNEL_CASES])
def test_op_cpu_matches_model_reference(moe_op, case):
    args, expected = kernel_inputs(case)
    got = torch.ops.hidream.HiDreamMoE(*args)
    assert got.dtype == args[0].dtype
    assert_close(error_stats(got, expected), case["dtype"], case["name"])


def test_op_rejects_bad_inputs(moe_op):
    args, _ = kernel_inputs(KERNEL_CASES[0])
    x, ids, scores, g, u, d = args
    with pytest.raises(MoEContractError, match="INT32"):
        torch.ops.hidream.HiDreamMoE(x, ids.long(), scores, g, u, d)
    with pytest.raises(MoEContractError, match="down_weights"):
        torch.ops.hidream.HiDreamMoE(x, ids, scores, g, u, d[:, :-1])
    with pytest.raises(MoEContractError, match="scores"):
        torch.ops.hidream.HiDreamMoE(x, ids, scores.double(), g, u, d)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_opcheck(moe_op, dtype):
    """Schema, fake-tensor kernel, and AOT-dispatch (static and dynamic) consistency."""
    args, _ = kernel_inputs(_case("opcheck", 13, 4, 2, "random", dtype=dtype))
    torch.library.opcheck(torch.ops.hidream.HiDreamMoE.default, args)


def test_export_moe_layer_traces_through_fake_kernel(moe_op):
    """torch.export with a symbolic token count keeps one hidream.HiDreamMoE node and runs any T."""
    moe = make_moe(32, 64, 4, 2).eval()
    moe.lowering = "plugin"
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    program = torch.export.export(moe, (torch.randn(19, 32),), dynamic_shapes=({0: tokens},))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.hidream.HiDreamMoE.default) == 1
    for T in (5, 64):
        x = torch.randn(T, 32)
        with torch.no_grad():
            expected = moe(x)
            moe.lowering = "reference"
            reference = moe(x)
            moe.lowering = "plugin"
        got = program.module()(x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert (got - reference).abs().max() <= FP32_REL * reference.abs().max()


def test_plugin_lowering_is_in_the_model_table(moe_op):
    from hidream_export.model import HiDreamTransformer
    from hidream_export.model.lowerings import EXPORT_LOWERINGS

    assert "plugin" in EXPORT_LOWERINGS
    assert HiDreamTransformer("tiny", moe_lowering="plugin").moe_lowering == "plugin"


def test_tiny_transformer_plugin_lowering_matches_reference(moe_op):
    from hidream_export.model import HiDreamTransformer

    torch.manual_seed(0)
    model = HiDreamTransformer("tiny").eval()
    inputs = tiny_transformer_inputs()
    with torch.no_grad():
        expected = model(*inputs)
        got = model.set_moe_lowering("plugin")(*inputs)
    assert_close(error_stats(got, expected), "float32", "tiny transformer, plugin lowering")


def test_stacked_weight_cache_follows_the_parameters(moe_op):
    moe = make_moe(32, 64, 4, 2)
    first = moe.stacked_expert_weights(torch.float32)
    assert moe.stacked_expert_weights(torch.float32)[0] is first[0], "unchanged weights: cache hit"

    with torch.no_grad():  # in-place update (optimizer step, copy_) bumps the version counter
        moe.experts[2].w3.weight.mul_(2)
    second = moe.stacked_expert_weights(torch.float32)
    assert torch.equal(second[1][2], moe.experts[2].w3.weight.t())

    state = {k: v * 0.5 for k, v in moe.state_dict().items()}
    moe.load_state_dict(state)
    third = moe.stacked_expert_weights(torch.float32)
    assert torch.equal(third[2][0], moe.experts[0].w2.weight.t())

    moe.experts[1].w1.weight.data = torch.randn_like(moe.experts[1].w1.weight)  # new storage
    assert torch.equal(moe.stacked_expert_weights(torch.float32)[0][1], moe.experts[1].w1.weight.t())

    half = moe.stacked_expert_weights(torch.float16)
    assert half[0].dtype == torch.float16

    # Writes through .data bypass the version counter: documented, and invalidate() handles it.
    moe.experts[0].w1.weight.data.add_(1.0)
    moe.invalidate_stacked_weights()
    assert torch.equal(moe.stacked_expert_weights(torch.float32)[0][0], moe.experts[0].w1.weight.t())

    from hidream_export.model import moe as model_moe

    model_moe.CACHE_STACKED_WEIGHTS = False
    try:
        moe.invalidate_stacked_weights()
        moe.stacked_expert_weights(torch.float32)
        assert "_hidream_stacked_weights" not in moe.__dict__
    finally:
        model_moe.CACHE_STACKED_WEIGHTS = True


# ================================================================================================
# CUDA (compiled kernels; skipped without a GPU)
# ================================================================================================
CUDA_CASES = [_case(f"cuda_{dt}_{routing}", 300, 4, 2, routing, dtype=dt, H=256, I=512, block=None)
              for dt in ("float32", "float16", "bfloat16") for routing in ("random", "one_empty")]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c["name"] for c in CUDA_CASES])
def test_cuda_op_matches_reference(moe_op, case):
    args, expected = kernel_inputs(case)
    args = tuple(a.cuda() for a in args)
    got = torch.ops.hidream.HiDreamMoE(*args)  # CUDA dispatch -> Triton kernels
    assert_close(error_stats(got.cpu(), expected), case["dtype"], case["name"])


@needs_cuda
@needs_triton
def test_cuda_kernels_never_sync_with_the_host(moe_op):
    from hidream_export.moe.kernels import moe_triton as moe_experts_triton

    args, expected = kernel_inputs(CUDA_CASES[0])
    args = tuple(a.cuda() for a in args)
    moe_experts_triton(*args)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = moe_experts_triton(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(error_stats(got.cpu(), expected), "float32", "no-sync run")


# The worker entry point (see the module docstring).
if __name__ == "__main__":
    mode = sys.argv[1]
    out = _worker_interpret() if mode == "interpret" else _worker_compile()
    print(RESULT_MARK + json.dumps(out), flush=True)
    sys.exit(0)
