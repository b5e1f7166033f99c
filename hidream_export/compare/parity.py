"""`hidream-export compare`: the PyTorch reference against an exported ONNX model, on the same inputs.

The reference is always the `reference` MoE lowering with float64 RoPE (diffusers' numerics) in float32,
whatever the export dtype, never the lowering that was exported, so a lowering bug cannot hide behind
itself and an fp16/bf16 export is measured against the model it approximates. Inputs and reference outputs are
saved in Polygraphy's formats, so anyone can re-check with Polygraphy alone:

    polygraphy run MODEL.onnx --onnxrt --load-inputs inputs.json --load-outputs reference_outputs.json

(and `--trt` on a GPU machine).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hidream_export.errors import CompareError
from hidream_export.manifest import Manifest, TransformerComponent
from hidream_export.runtime.ort_kernels import check_providers
from hidream_export.variants import SIZE_MULTIPLE, VAE_SCALE, SizeRange, parse_size

# Default pass criteria per export dtype. fp32: the exported graph differs from the reference only in
# summation order (and float32 RoPE tables, which are exact), ~1e-6 relative; 1e-4 leaves room for
# larger models. fp16/bf16: elementwise closeness is meaningless once MoE routing can flip on near-ties,
# so the bound is cosine similarity plus a loose max error relative to the output scale.
TOLERANCES = {
    "fp32": {"rtol": 1e-4, "atol": 0.0, "min_cosine": 0.99999},
    "fp16": {"rtol": 1e-1, "atol": 0.0, "min_cosine": 0.999},
    "bf16": {"rtol": 2e-1, "atol": 0.0, "min_cosine": 0.999},
}


# Gap between the k-th and the (k+1)-th routing probability under which the export may pick the other
# expert without being wrong: both sides compute the softmax, in their own summation order and dtype.
NEAR_TIE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}


@dataclasses.dataclass
class CaseResult:
    size: tuple[int, int]  # (width, height) px
    batch: int
    output: str
    max_abs_err: float  # over the output, near-tie tokens excluded
    mean_abs_err: float
    max_rel_err: float  # max |err| / max |reference|, near-tie tokens excluded
    cosine: float  # over the whole output
    passed: bool
    scale: float  # max |reference|
    near_tie_tokens: int = 0  # image tokens whose top-k routing was a near tie in some MoE layer
    near_tie_max_abs_err: float = 0.0  # the largest error inside those tokens' output patches


@dataclasses.dataclass
class CompareReport:
    model: str
    dtype: str
    tolerance: dict
    cases: list[CaseResult]
    inputs_json: str | None = None
    outputs_json: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def polygraphy_tolerances(self) -> tuple[float, float]:
        """(atol, rtol) for Polygraphy's elementwise check expressing the same bound: our criterion is
        relative to the output's scale, so it becomes an absolute tolerance at the smallest scale."""
        scale = min(c.scale for c in self.cases)
        return self.tolerance["atol"] + self.tolerance["rtol"] * scale, 0.0

    def polygraphy_command(self) -> str:
        atol, rtol = self.polygraphy_tolerances()
        return (f"polygraphy run {self.model} --onnxrt --load-inputs {self.inputs_json} "
                f"--load-outputs {self.outputs_json} --atol {atol:.3g} --rtol {rtol:g}")

    def format(self) -> str:
        lines = [f"{self.model} ({self.dtype}): tolerance max|err| <= {self.tolerance['atol']} + "
                 f"{self.tolerance['rtol']} * max|ref|, cosine >= {self.tolerance['min_cosine']}",
                 f"{'size':>11} {'batch':>5} {'output':<8} {'max_abs':>10} {'mean_abs':>10} {'max_rel':>10} "
                 f"{'cosine':>10}  verdict"]
        for c in self.cases:
            ties = (f"  ({c.near_tie_tokens} near-tie token(s) judged apart: max|err| {c.near_tie_max_abs_err:.3e} "
                    f"there)") if c.near_tie_tokens else ""
            lines.append(f"{c.size[0]:>5}x{c.size[1]:<5} {c.batch:>5} {c.output:<8} {c.max_abs_err:>10.3e} "
                         f"{c.mean_abs_err:>10.3e} {c.max_rel_err:>10.3e} {c.cosine:>10.7f}  "
                         f"{'ok' if c.passed else 'FAIL'}{ties}")
        if any(c.near_tie_tokens for c in self.cases):
            lines.append(f"near-tie tokens: the reference's two candidate experts scored within "
                         f"{NEAR_TIE[self.dtype]:g} of each other, so either choice is right; their output patches "
                         f"are left out of max|err| (cosine covers everything)")
        lines += [f"note: {n}" for n in self.notes]
        if self.inputs_json:
            lines.append(f"saved {self.inputs_json} and {self.outputs_json}; re-check with:\n  "
                         f"{self.polygraphy_command()}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def metrics(got: np.ndarray, ref: np.ndarray) -> dict:
    g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    d = np.abs(g - r)
    scale = float(np.abs(r).max()) or 1.0
    denom = float(np.linalg.norm(g) * np.linalg.norm(r))
    return {"max_abs_err": float(d.max()), "mean_abs_err": float(d.mean()), "max_rel_err": float(d.max()) / scale,
            "cosine": float(g @ r / denom) if denom else (1.0 if not d.any() else 0.0), "scale": scale}


class NearTies:
    """Records, while the reference runs, the image tokens whose top-k routing is a near tie in any MoE layer
    (a hook on each router recomputes its softmax from the router's input)."""

    def __init__(self, model, batch: int, n_img: int, eps: float):
        from hidream_export.model.moe import MoEGate

        self.batch, self.n_img, self.eps = batch, n_img, eps
        self.tokens: set[tuple[int, int]] = set()  # (sample, image token)
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, MoEGate)]

    def _hook(self, gate, inputs, _output) -> None:
        import torch

        x = inputs[0]
        scores = torch.softmax(x.float() @ gate.weight.float().t(), dim=-1)
        top = scores.topk(min(gate.top_k + 1, scores.shape[-1]), dim=-1).values
        if top.shape[-1] <= gate.top_k:
            return  # every expert is picked: nothing to tie
        tied = (top[:, gate.top_k - 1] - top[:, gate.top_k]) < self.eps
        per_sample = x.shape[0] // self.batch
        for row in torch.nonzero(tied).flatten().tolist():
            sample, pos = divmod(row, per_sample)
            if pos < self.n_img:  # image tokens map to output patches; others only steer them
                self.tokens.add((sample, pos))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _tie_mask(tokens: set[tuple[int, int]], shape: tuple, patch: int) -> np.ndarray:
    """True over the output patches of the near-tie image tokens (row-major tokens, `patch` latent cells)."""
    mask = np.zeros(shape, dtype=bool)
    cols = shape[3] // patch
    for sample, pos in tokens:
        r, c = divmod(pos, cols)
        mask[sample, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = True
    return mask


def default_sizes(size_range: SizeRange, max_seq: int) -> list[tuple[int, int]]:
    """opt, smallest, largest, and a non-square size that fits the padding length."""
    sizes = [size_range.opt, size_range.min, size_range.max]
    w, h = size_range.max[0], size_range.min[1]
    while w > size_range.min[0] and (w // SIZE_MULTIPLE) * (h // SIZE_MULTIPLE) > max_seq:
        w -= SIZE_MULTIPLE
    if w != h:
        sizes.append((w, h))
    out = []
    for s in sizes:
        if tuple(s) not in out:
            out.append(tuple(s))
    return out


def random_feed(entry: TransformerComponent, width: int, height: int, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs matching the exported contract (shapes/dtypes from the manifest entry)."""
    rng = np.random.default_rng(seed)
    dims = {"batch": batch, "latent_height": height // VAE_SCALE, "latent_width": width // VAE_SCALE}
    feed = {}
    for spec in entry.inputs:
        shape = [dims[d] if isinstance(d, str) else d for d in spec.shape]
        if spec.name == "timesteps":
            t = rng.uniform(0, 1000, size=shape)
            feed["timesteps"] = t.astype(np.int64) if spec.dtype == "int64" else t.astype(np.float32)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _ort_dtype_feed(feed: dict, dtype: str) -> dict:
    if dtype == "fp32":
        return feed
    import ml_dtypes

    np_dtype = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}[dtype]
    return {k: (v.astype(np_dtype) if v.dtype == np.float32 and k != "timesteps" else v) for k, v in feed.items()}


def compare_onnx(checkpoint: str | Path, model_path: str | Path, *, sizes=None, batch: int | None = None,
                 seed: int = 0, atol: float | None = None, rtol: float | None = None,
                 min_cosine: float | None = None, save_dir: str | Path | None = None, config=None,
                 providers=None) -> CompareReport:
    import onnxruntime as ort
    import torch

    from hidream_export.export.common import model_errors
    from hidream_export.model.checkpoint import load_transformer

    model_path = Path(model_path)
    if not model_path.is_file():
        raise CompareError(f"{model_path}: no such ONNX model")
    folder = model_path.parent.parent
    manifest = Manifest.read(folder)
    entry = manifest.transformer
    if entry is None or manifest.file_path(folder, "transformer").resolve() != model_path.resolve():
        raise CompareError(f"{model_path} is not the transformer recorded in {folder / 'manifest.json'}")
    dtype = entry.dtype
    tol = dict(TOLERANCES[dtype])
    for k, v in (("atol", atol), ("rtol", rtol), ("min_cosine", min_cosine)):
        if v is not None:
            tol[k] = v
    providers = list(providers or ["CPUExecutionProvider"])
    check_providers(entry, providers, str(model_path))  # before the reference model is loaded
    size_range = entry.size_range
    sizes = [parse_size(s) if isinstance(s, str) else tuple(s) for s in (sizes or default_sizes(size_range, entry.max_seq))]
    batch = batch or entry.batch_multiple
    lo, hi = entry.batch_range
    if not lo <= batch <= hi or batch % entry.batch_multiple:
        raise CompareError(f"--batch {batch} is outside the exported batch range {lo}..{hi} "
                           f"(multiples of {entry.batch_multiple})")
    for w, h in sizes:
        size_range.check(w, h, max_seq=entry.max_seq)

    with model_errors():
        reference = load_transformer(checkpoint, dtype=torch.float32, moe_lowering="reference", config=config,
                                     rope_dtype="float64")
    notes = []
    source = entry.source.get("checkpoint_sha256")
    if source and source != _checkpoint_hash(checkpoint, config):
        notes.append(f"{checkpoint} is not the checkpoint this export was made from (sha256 {source[:12]}... in "
                     f"{folder / 'manifest.json'}); large differences are expected")
    session = ort.InferenceSession(str(model_path), providers=providers)
    patch = reference.config.patch_size
    feeds, outputs, cases = [], [], []
    for i, (w, h) in enumerate(sizes):
        feed = random_feed(entry, w, h, batch, seed + i)
        ties = NearTies(reference, batch, (h // VAE_SCALE // patch) * (w // VAE_SCALE // patch), NEAR_TIE[dtype])
        try:
            with torch.no_grad():
                ref = reference(*(torch.from_numpy(feed[n]) for n in ("hidden_states", "timesteps",
                                "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds"))).numpy()
        finally:
            ties.close()
        ort_feed = _ort_dtype_feed(feed, dtype)
        got = session.run(["sample"], ort_feed)[0].astype(np.float32)
        m = metrics(got, ref)
        mask = _tie_mask(ties.tokens, ref.shape, patch)
        rest = metrics(np.where(mask, ref, got), ref) if mask.any() else m
        tie_err = float(np.abs(got - ref)[mask].max()) if mask.any() else 0.0
        ok = rest["max_abs_err"] <= tol["atol"] + tol["rtol"] * m["scale"] and m["cosine"] >= tol["min_cosine"]
        cases.append(CaseResult((w, h), batch, "sample", rest["max_abs_err"], m["mean_abs_err"],
                                rest["max_abs_err"] / m["scale"], m["cosine"], bool(ok), m["scale"],
                                len(ties.tokens), tie_err))
        feeds.append(ort_feed)
        outputs.append({"sample": ref.astype(got.dtype)})
    report = CompareReport(str(model_path), dtype, tol, cases, notes=notes)
    if save_dir is not None:
        report.inputs_json, report.outputs_json = save_polygraphy(Path(save_dir), feeds, outputs)
    return report


def _checkpoint_hash(checkpoint, config) -> str:
    """The hash an export records for its source checkpoint (weights files and config.json)."""
    from hidream_export.export.common import model_errors
    from hidream_export.files import sha256_files
    from hidream_export.model.checkpoint import locate_checkpoint

    with model_errors():
        ckpt = locate_checkpoint(checkpoint, config)
    return sha256_files(ckpt.files + ([ckpt.config_file] if ckpt.config_file else []))


def save_polygraphy(folder: Path, feeds: list[dict], outputs: list[dict]) -> tuple[str, str]:
    """inputs.json (a list of feed dicts) and reference_outputs.json (RunResults) in Polygraphy's formats."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    folder.mkdir(parents=True, exist_ok=True)
    inputs_path, outputs_path = folder / "inputs.json", folder / "reference_outputs.json"
    save_json(feeds, str(inputs_path))
    results = RunResults()
    results.append(("pytorch-reference", [IterationResult(o, runner_name="pytorch-reference") for o in outputs]))
    results.save(str(outputs_path))
    return str(inputs_path), str(outputs_path)


def tolerance_summary() -> str:
    return "; ".join(f"{k}: rtol {v['rtol']}, cosine >= {v['min_cosine']}" for k, v in TOLERANCES.items())


