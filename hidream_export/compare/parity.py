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


# Quantized transformers (manifest `quant`), against the same fp32 reference: cosine, and for the weight-only
# schemes the share of routed tokens whose top-2 experts stay the same (FP8 reports it: its activations are
# rounded too, so it is a measure there, not a bound). The max error is loose: a token whose routing flips
# gets other experts' output. Measured on `small` at 512 and 1024 px and Dev timesteps: README.
QUANT_TOLERANCES = {
    "int8": {"rtol": 0.5, "atol": 0.0, "min_cosine": 0.9995, "min_routing": 0.99},
    "int4": {"rtol": 1.5, "atol": 0.0, "min_cosine": 0.99, "min_routing": 0.99},
    "fp8": {"rtol": 1.0, "atol": 0.0, "min_cosine": 0.99},
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
    timestep: float | None = None  # the fed timestep when the case fixes one (sampling timesteps)
    routing_agreement: float | None = None  # routed tokens (all MoE layers) whose top-k expert set is the same


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
        routing = f", routing agreement >= {self.tolerance['min_routing']}" if "min_routing" in self.tolerance else ""
        lines = [f"{self.model} ({self.dtype}): tolerance max|err| <= {self.tolerance['atol']} + "
                 f"{self.tolerance['rtol']} * max|ref|, cosine >= {self.tolerance['min_cosine']}{routing}",
                 f"{'size':>11} {'batch':>5} {'t':>7} {'output':<8} {'max_abs':>10} {'mean_abs':>10} {'max_rel':>10} "
                 f"{'cosine':>10} {'routing':>8}  verdict"]
        for c in self.cases:
            ties = (f"  ({c.near_tie_tokens} near-tie token(s) judged apart: max|err| {c.near_tie_max_abs_err:.3e} "
                    f"there)") if c.near_tie_tokens else ""
            t = "random" if c.timestep is None else f"{c.timestep:g}"
            agree = "-" if c.routing_agreement is None else f"{c.routing_agreement:.2%}"
            lines.append(f"{c.size[0]:>5}x{c.size[1]:<5} {c.batch:>5} {t:>7} {c.output:<8} {c.max_abs_err:>10.3e} "
                         f"{c.mean_abs_err:>10.3e} {c.max_rel_err:>10.3e} {c.cosine:>10.7f} {agree:>8}  "
                         f"{'ok' if c.passed else 'FAIL'}{ties}")
        if any(c.near_tie_tokens for c in self.cases):
            lines.append(f"near-tie tokens: the reference's two candidate experts scored within "
                         f"{NEAR_TIE.get(self.dtype, NEAR_TIE['fp32']):g} of each other, so either choice is right; their output patches "
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
    (a hook on each router recomputes its softmax from the router's input), and every layer's top-k experts
    (`routes`, in call order: the order of the graph's router TopK nodes)."""

    def __init__(self, model, batch: int, n_img: int, eps: float):
        from hidream_export.model.moe import MoEGate

        self.batch, self.n_img, self.eps = batch, n_img, eps
        self.tokens: set[tuple[int, int]] = set()  # (sample, image token)
        self.routes: list[np.ndarray] = []  # per MoE layer: (tokens, k) expert ids, sorted per token
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, MoEGate)]

    def _hook(self, gate, inputs, output) -> None:
        import torch

        self.routes.append(np.sort(output[0].numpy(), axis=-1))
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


def router_topk_outputs(graph) -> list[str]:
    """The expert-index outputs of the graph's MoE routers (TopK fed by a Softmax), in graph order."""
    producers = {o: n for n in graph.node for o in n.output}
    return [n.output[1] for n in graph.node if n.op_type == "TopK" and len(n.output) > 1 and
            getattr(producers.get(n.input[0]), "op_type", None) == "Softmax"]


def _session_with_routes(ort, model_path: Path, providers: list, config: dict):
    """An ONNX Runtime session of the model that also returns each router's top-k expert ids (the graph is
    read without its weights and given extra outputs; the weights load from the model's own folder)."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(model_path), load_external_data=False)
    routes = router_topk_outputs(proto.graph)
    proto.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.INT64, None) for name in routes)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=providers), routes


def routing_agreement(reference: list[np.ndarray], exported: list[np.ndarray]) -> float | None:
    """The share of routed tokens, over all MoE layers, whose top-k expert set is the same in both runs."""
    if not reference or len(reference) != len(exported):
        return None
    same = total = 0
    for ref, got in zip(reference, exported):
        got = np.sort(got.reshape(ref.shape), axis=-1)
        same += int((ref == got).all(axis=-1).sum())
        total += ref.shape[0]
    return same / total if total else None


def sampling_timesteps(variant, count: int = 3) -> list[float]:
    """`count` of a variant's sampling timesteps, evenly spaced over its recipe (first and last included)."""
    from hidream_export.runtime.schedulers import make_scheduler

    steps = np.asarray(make_scheduler(variant).timesteps, dtype=np.float64)
    picks = np.unique(np.linspace(0, len(steps) - 1, min(count, len(steps))).round().astype(int))
    return [float(steps[i]) for i in picks]


def compare_onnx(checkpoint: str | Path, model_path: str | Path, *, sizes=None, batch: int | None = None,
                 seed: int = 0, atol: float | None = None, rtol: float | None = None,
                 min_cosine: float | None = None, save_dir: str | Path | None = None, config=None,
                 providers=None, timesteps=None, min_routing: float | None = None) -> CompareReport:
    """PyTorch reference vs ONNX Runtime per (size, timestep). `timesteps`: None (random per case), a list of
    timesteps, or "recipe" (three of the variant's sampling timesteps). Quantized exports (manifest `quant`)
    are judged by QUANT_TOLERANCES, including the routing agreement."""
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
    tol = dict(QUANT_TOLERANCES[entry.quant.scheme] if entry.quant else TOLERANCES[dtype])
    for k, v in (("atol", atol), ("rtol", rtol), ("min_cosine", min_cosine), ("min_routing", min_routing)):
        if v is not None:
            tol[k] = v
    if timesteps == "recipe":
        timesteps = sampling_timesteps(manifest.variant)
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
    session, route_names = _session_with_routes(ort, model_path, providers,
                                                entry.quant.ort_session_config() if entry.quant else {})
    patch = reference.config.patch_size
    feeds, outputs, cases = [], [], []
    runs = [(size, t) for size in sizes for t in (timesteps or [None])]
    for i, ((w, h), t) in enumerate(runs):
        feed = random_feed(entry, w, h, batch, seed + i)
        if t is not None:
            feed["timesteps"] = np.full_like(feed["timesteps"], t)
        ties = NearTies(reference, batch, (h // VAE_SCALE // patch) * (w // VAE_SCALE // patch), NEAR_TIE[dtype])
        try:
            with torch.no_grad():
                ref = reference(*(torch.from_numpy(feed[n]) for n in ("hidden_states", "timesteps",
                                "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds"))).numpy()
        finally:
            ties.close()
        ort_feed = _ort_dtype_feed(feed, dtype)
        got, *routes = session.run(["sample", *route_names], ort_feed)
        got = got.astype(np.float32)
        agreement = routing_agreement(ties.routes, routes)
        m = metrics(got, ref)
        mask = _tie_mask(ties.tokens, ref.shape, patch)
        rest = metrics(np.where(mask, ref, got), ref) if mask.any() else m
        tie_err = float(np.abs(got - ref)[mask].max()) if mask.any() else 0.0
        ok = rest["max_abs_err"] <= tol["atol"] + tol["rtol"] * m["scale"] and m["cosine"] >= tol["min_cosine"] \
            and (agreement is None or agreement >= tol.get("min_routing", 0.0))
        cases.append(CaseResult((w, h), batch, "sample", rest["max_abs_err"], m["mean_abs_err"],
                                rest["max_abs_err"] / m["scale"], m["cosine"], bool(ok), m["scale"],
                                len(ties.tokens), tie_err, t, agreement))
        feeds.append(ort_feed)
        outputs.append({"sample": ref.astype(got.dtype)})
    if entry.quant:
        notes.append(f"quantized: {entry.quant.describe()}; routing = share of routed tokens whose top-"
                     f"{reference.config.num_activated_experts} experts match the reference's, over every MoE layer")
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


