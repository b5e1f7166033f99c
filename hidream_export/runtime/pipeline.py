"""The torch-free HiDream-I1 text-to-image pipeline, running an engine folder (engines/README.md).

Same flow as diffusers' ``HiDreamImagePipeline``, in numpy:

1. size: HiDream's area rule, then checks against what the transformer was exported for;
2. encode the prompt (and, for CFG, the negative prompt) with CLIP-L, CLIP-G, T5 and Llama;
3. draw the initial latents from one seeded generator;
4. for each timestep: velocity = -transformer(...) (CFG: ``uncond + g * (cond - uncond)``), then the
   numpy scheduler's step (Dev/Fast re-noise with noise from the same generator);
5. decode with the VAE (its graph includes the latent scaling and the [0, 1] mapping) and round to uint8
   like diffusers' ``numpy_to_pil``.

Nothing here imports torch. The math is float32 throughout on the host side (the references keep
latents in the model dtype; for an fp32 export the two are the same, for fp16/bf16 exports ours keeps
more precision in the scheduler, the models run in their own dtype either way).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import ManifestError, RequestError
from ..files import read_json_object
from ..manifest import Manifest, TokenizerComponent, TransformerComponent
from ..variants import SIZE_MULTIPLE, VAE_SCALE, SizeRange, Variant, default_size
from . import lora
from .backends import Backend, Session, get_backend
from .lora import AppliedLoras
from .report import Timings
from .schedulers import FLAVOURS, make_scheduler
from .text import ENCODERS, PromptTokenizer, TextEncoders

__all__ = ["GenerationResult", "Pipeline", "TransformerInfo"]

# Model components every engine folder has (the manifest's names; tokenizers are tokenizer_<encoder>).
MODEL_COMPONENTS = ("transformer", *ENCODERS, "vae_decoder")


@dataclass(frozen=True)
class TransformerInfo:
    """What the exported transformer accepts, from its manifest entry: sizes, batch, input dtypes."""

    size_range: SizeRange
    max_seq: int  # image tokens a non-square input is padded to; larger non-square sizes cannot run
    patch_px: int  # pixels per image token side (patch_size latent cells * VAE_SCALE)
    in_channels: int
    default_side: int  # side of the default square image; its area is the size rule's target
    batch_range: tuple[int, int]
    batch_multiple: int
    timestep_dtype: np.dtype

    @classmethod
    def from_component(cls, entry: TransformerComponent, engine=None) -> "TransformerInfo":
        """From the transformer's manifest entry; a TensorRT engine's entry (built for a narrower profile)
        overrides its inputs."""
        if entry.size_range is None:
            raise ManifestError("the transformer's manifest entry records no size_range")
        config = entry.config or {}
        patch = int(config.get("patch_size", 2))
        max_resolution = config.get("max_resolution")
        # The reference pipelines target default_sample_size * 8 = 1024 px, the real transformer's
        # max_resolution (128 latent cells) * 8. Smaller test models scale it like their size range.
        default_side = int(max(max_resolution)) * VAE_SCALE if max_resolution else max(entry.size_range.opt)
        max_seq = entry.max_seq
        if max_seq is None:
            max_seq = (math.prod(max_resolution) // patch ** 2) if max_resolution else 4096
        inputs = {i.name: i for i in (engine.inputs if engine is not None and engine.inputs else entry.inputs)}
        hidden = inputs.get("hidden_states")
        shape = hidden.shape if hidden is not None else ()
        in_channels = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else int(config.get("in_channels", 16))
        t = inputs.get("timesteps")
        t_dtype = _np_dtype(t.dtype if t is not None else "float32")
        return cls(size_range=entry.size_range, max_seq=int(max_seq), patch_px=patch * VAE_SCALE,
                   in_channels=in_channels, default_side=default_side, batch_range=entry.batch_range,
                   batch_multiple=int(entry.batch_multiple), timestep_dtype=t_dtype)

    def feed_batch(self, rows: int) -> int:
        """The batch to run ``rows`` images' rows as: at least the exported minimum, in multiples of
        ``batch_multiple`` (a Full export run without CFG pads 1 row to its [uncond, cond] pair)."""
        b = max(rows, self.batch_range[0])
        return -(-b // self.batch_multiple) * self.batch_multiple


@dataclass
class GenerationResult:
    """One generated image and how it was made."""

    image: Any  # PIL.Image.Image, RGB
    array: np.ndarray  # the same image as float32 (H, W, 3) in [0, 1], before rounding to uint8
    seed: int | None  # None when the latents and noise were all injected
    width: int
    height: int
    steps: int
    guidance_scale: float
    prompt: str
    negative_prompt: str | None  # None without CFG
    timings: Timings
    latents: np.ndarray | None = None  # final latents (1, C, H/8, W/8), when asked for
    info: dict = field(default_factory=dict)  # variant, scheduler, backend

    def report(self) -> dict[str, Any]:
        """Everything but the pixels, JSON-ready."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                "width": self.width, "height": self.height, "steps": self.steps,
                "guidance_scale": self.guidance_scale, **self.info, "timings": self.timings.as_dict()}


class Pipeline:
    """HiDream-I1 text-to-image on an engine folder, with no torch.

    Build one with ``Pipeline.from_dir(folder)``; call it with a prompt to get a GenerationResult.

    Thread safety: a Pipeline holds only read-only state after loading (manifest data, tokenizers,
    backend sessions, the scheduler config), and every call makes its own scheduler, random
    generator, latents and Timings. So one Pipeline may be shared by threads and called from them at
    once when its backend is thread-safe (``backend.thread_safe``: onnxruntime's
    ``InferenceSession.run`` and ``tokenizers``' encode are); with a backend that is not (a TensorRT
    execution context), calls are serialised by a lock. Concurrent calls share the CPU/GPU, so they do
    not run faster than sequential ones; the point is that sharing is safe. The result objects and the
    numpy generator are per call and must not be shared while a call is running.
    """

    def __init__(self, folder: Path, manifest: Manifest, variant: Variant, transformer_info: TransformerInfo,
                 sessions: Mapping[str, Session], text_encoders: TextEncoders, backend: Backend,
                 scheduler_config: Mapping[str, Any] | None, scheduler_flavour: str = "diffusers",
                 progress: bool | None = None, load_timings: Timings | None = None,
                 loras: AppliedLoras | None = None):
        if scheduler_flavour not in FLAVOURS:
            raise RequestError(f"unknown scheduler flavour {scheduler_flavour!r}; expected one of {list(FLAVOURS)}")
        self.folder = folder
        self.manifest = manifest
        self.variant = variant
        self.transformer_info = transformer_info
        self.sessions = dict(sessions)
        self.text_encoders = text_encoders
        self.backend = backend
        self.scheduler_config = scheduler_config
        self.scheduler_flavour = scheduler_flavour
        self.progress = progress
        self.load_timings = load_timings or Timings()
        self._lock = contextlib.nullcontext() if backend.thread_safe else threading.Lock()
        self.loras = loras or AppliedLoras()  # the LoRAs the transformer runs with (set_loras switches them)
        self._lora_lock = threading.Lock()
        self.make_scheduler(1)  # an unsupported scheduler config fails now, not at the first image

    # --- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, folder: str | Path, backend: str | Backend = "ort", providers: Sequence[Any] | None = None,
                 scheduler_flavour: str = "diffusers", *, threads: int | None = None, verify: bool = True,
                 progress: bool | None = None, loras: Sequence[Any] = ()) -> "Pipeline":
        """Load an engine folder written by ``hidream-export build``.

        The manifest is read and checked first (missing, newer format, missing files, hash
        mismatches: ManifestError naming the file), then tokenizers and one backend session per
        model component are loaded. ``verify=False`` skips the SHA-256 pass (files must still exist
        with their recorded sizes), which matters for the real model's ~60 GB of weights.
        ``providers``/``threads`` configure the "ort" backend. ``scheduler_flavour``: "diffusers"
        (default, what the HF folders configure) or "official" (the HiDream-I1 repository's).
        ``loras``: LoRA files applied to the transformer at load time, as paths or (path, scale) pairs
        (see ``set_loras``); the folder's files are not changed.
        """
        if scheduler_flavour not in FLAVOURS:
            raise RequestError(f"unknown scheduler flavour {scheduler_flavour!r}; expected one of {list(FLAVOURS)}")
        timings = Timings()
        start = time.perf_counter()
        folder = Path(folder)
        manifest = Manifest.read(folder)
        components = manifest.components
        backend = get_backend(backend, providers=providers, threads=threads)

        keys = {name: backend.component_key(manifest, name) for name in MODEL_COMPONENTS}
        needed = [*keys.values(), *(f"tokenizer_{n}" for n in ENCODERS)]
        if "scheduler" in components:
            needed.append("scheduler")
        if loras:
            needed.append("transformer")  # LoRA deltas are added to the ONNX export's weights (also for TensorRT)
        with timings.measure("verify"):
            manifest.verify(folder, needed, check_hashes=verify)
        update = None
        if loras:
            with timings.measure("loras"):
                update = lora.resolve(folder, manifest, loras)

        transformer = manifest.component("transformer", TransformerComponent, folder)
        engine = components[keys["transformer"]] if keys["transformer"] != "transformer" else None
        info = TransformerInfo.from_component(transformer, engine)

        with timings.measure("tokenizers"):
            tokenizers = {n: PromptTokenizer.from_component(manifest.file_path(folder, f"tokenizer_{n}"), n,
                                                            manifest.component(f"tokenizer_{n}", TokenizerComponent))
                          for n in ENCODERS}
        sessions = {}
        for name, key in keys.items():
            with timings.measure(f"load_{name}"):
                extra = {"initializers": update.initializers} if name == "transformer" and update else {}
                sessions[name] = backend.load(manifest.file_path(folder, key), components[key], **extra)
        fixed = {n: components[keys[n]].fixed_batch if hasattr(components[keys[n]], "fixed_batch") else None
                 for n in ENCODERS}
        text_encoders = TextEncoders(tokenizers, {n: sessions[n] for n in ENCODERS}, fixed)

        scheduler_config = None
        if "scheduler" in components:
            scheduler_config = read_json_object(manifest.file_path(folder, "scheduler"), "scheduler config")
        timings.add("load", time.perf_counter() - start)
        variant = manifest.variant
        return cls(folder, manifest, variant, info, sessions, text_encoders, backend, scheduler_config,
                   scheduler_flavour, progress, timings, update.applied if update else None)

    def set_loras(self, loras: Sequence[Any] = ()) -> None:
        """Run the transformer with these LoRAs from the next call on: paths or (path, scale) pairs, applied
        together in order (scale: peft's set_adapters weight, default 1.0); ``[]`` for none. Only the
        transformer changes (onnxruntime: a new session; TensorRT: an in-place refit); nothing happens when
        the set is the one already applied. The folder's files are never modified. A call already running
        finishes with the LoRAs it started with; a refused set (one line, naming the file and keys) leaves
        the current one in place."""
        with self._lora_lock:
            update = lora.resolve(self.folder, self.manifest, loras, self.loras)
            if update is None:
                return
            key = self.backend.component_key(self.manifest, "transformer")
            with self._lock:  # a backend that is not thread-safe (TensorRT) refits between calls only
                self.sessions["transformer"] = self.backend.update_initializers(
                    self.sessions["transformer"], self.manifest.file_path(self.folder, key),
                    self.manifest.components[key], update.initializers, update.restore)
                self.loras = update.applied

    def __repr__(self) -> str:
        r = self.transformer_info.size_range
        return (f"Pipeline({str(self.folder)!r}, variant={self.variant.name!r}, backend={self.backend.describe()!r}, "
                f"sizes={r.min[0]}x{r.min[1]}..{r.max[0]}x{r.max[1]})")

    # --- recipe -----------------------------------------------------------------------------------
    def make_scheduler(self, steps: int | None = None):
        """A fresh scheduler for one generation (UniPC keeps multistep state, so never share one)."""
        return make_scheduler(self.variant, flavour=self.scheduler_flavour, config=self.scheduler_config,
                              num_steps=steps)

    def resolve_size(self, width: int | None = None, height: int | None = None, any_size: bool = False
                     ) -> tuple[int, int]:
        """The (width, height) a request runs at, or RequestError saying why it cannot.

        Default: HiDream's rule, which rescales any request (or the default square) to the model's
        ~1 MP area in multiples of 16, keeping the aspect ratio; both reference pipelines do this
        whatever size is asked for. ``any_size=True`` opts out: the size is used as
        given. Either way the result must lie in the exported range, be a multiple of 16 and, when
        not square, fit the transformer's max_seq image tokens (non-square inputs are padded to it).
        """
        for name, value in (("width", width), ("height", height)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise RequestError(f"{name} must be an integer number of pixels, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise RequestError(f"{name} must be positive, got {value}")
        info = self.transformer_info
        side = info.default_side
        if any_size:
            w, h = int(width or side), int(height or side)
        else:
            w, h = default_size(side * side, int(width) if width else None, int(height) if height else None)
        self.check_size(w, h)
        return w, h

    def check_size(self, width: int, height: int) -> None:
        info = self.transformer_info
        for name, value in (("width", width), ("height", height)):
            if value % SIZE_MULTIPLE:
                raise RequestError(f"{name}={value} is not a multiple of {SIZE_MULTIPLE} px; allowed sizes: "
                                 f"{info.size_range.describe()}")
        info.size_range.check(width, height, max_seq=info.max_seq, patch_px=info.patch_px)

    # --- generation -------------------------------------------------------------------------------
    def __call__(self, prompt: str, negative_prompt: str | None = None, width: int | None = None,
                 height: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
                 seed: int | None = None, *, any_size: bool = False, return_latents: bool = False,
                 callback: Callable[[int, Any, np.ndarray], Any] | None = None,
                 latents: np.ndarray | None = None, noise: Sequence[np.ndarray | None] | None = None,
                 progress: bool | None = None, allow_cfg: bool = False) -> GenerationResult:
        """Generate one image.

        ``steps``/``guidance_scale`` default to the variant's recipe (Full 50/5.0, Dev 28/0, Fast 16/0);
        CFG runs when guidance_scale > 1, with ``negative_prompt`` (default ""). ``seed`` seeds one
        ``numpy.random.Generator(PCG64(seed))`` that draws the initial latents (float32 standard normal,
        (1, C, H/8, W/8)) and then, step by step, each step's re-noise draw for the Dev/Fast
        scheduler, so a seed gives the same image bit for bit on one backend and machine. ``seed=None``
        picks one at random; the result records it. ``latents``/``noise`` (one array per step) replace
        those draws, for comparisons with other implementations. ``callback(i, timestep, latents)`` runs
        after each step with a read-only view of the latents (raise to stop). A negative prompt has no
        effect without CFG, as in the reference pipelines. ``progress``: tqdm bar (None: only on a terminal).
        CFG on a guidance-distilled variant (Dev, Fast) is refused unless ``allow_cfg``. What the request
        asked for and did not get as asked (a rescaled size, an unused negative prompt) is listed in
        ``result.info["notes"]``.

        Every argument is checked before any model runs.
        """
        with self._lock:
            return self._generate(prompt, negative_prompt, width, height, steps, guidance_scale, seed,
                                  any_size, return_latents, callback, latents, noise, progress, allow_cfg)

    def _generate(self, prompt, negative_prompt, width, height, steps, guidance_scale, seed, any_size,
                  return_latents, callback, latents, noise, progress, allow_cfg=False) -> GenerationResult:
        timings = Timings()
        t_start = time.perf_counter()
        with timings.measure("validate"):
            req = self._check_request(prompt, negative_prompt, width, height, steps, guidance_scale, seed,
                                      any_size, callback, latents, noise, allow_cfg)
        scheduler, w, h, cfg = req["scheduler"], req["width"], req["height"], req["cfg"]
        info = self.transformer_info
        shape = (1, info.in_channels, h // VAE_SCALE, w // VAE_SCALE)

        # One generator for everything random, in a fixed order: initial latents, then per step.
        # The latents are drawn even when injected, so step k's noise depends on the seed alone.
        rng = np.random.Generator(np.random.PCG64(req["seed"])) if req["seed"] is not None else None
        drawn = rng.standard_normal(shape, dtype=np.float32) if rng is not None else None
        x = np.array(latents, dtype=np.float32) if latents is not None else drawn

        prompts = [req["negative_prompt"], prompt] if cfg else [prompt]
        cond = self.text_encoders.encode(prompts, timings, stacklevel=4)  # warnings point at the caller
        rows = len(prompts)
        batch = info.feed_batch(rows)
        t5, pooled = _pad_rows(cond.t5, 0, batch), _pad_rows(cond.pooled, 0, batch)
        llama = _pad_rows(cond.llama, 1, batch)  # layer-first: the batch is axis 1
        transformer, loras = self.sessions["transformer"], self.loras.records
        g = np.float32(req["guidance_scale"])

        bar = self._progress_bar(scheduler.num_steps, progress)
        try:
            for i, t in enumerate(scheduler.timesteps):
                step_start = time.perf_counter()
                feeds = {
                    "hidden_states": np.repeat(x, batch, axis=0) if batch > 1 else x,
                    "timesteps": np.full((batch,), t, dtype=info.timestep_dtype),
                    "encoder_hidden_states_t5": t5,
                    "encoder_hidden_states_llama3": llama,
                    "pooled_embeds": pooled,
                }
                with timings.measure("transformer"):
                    out = transformer.run(feeds)
                # The model predicts -velocity; the schedulers take the velocity. Rows past
                # `rows` are batch padding.
                v = -_output(out, "sample")[:rows].astype(np.float32, copy=False)
                if cfg:
                    uncond, text = v[0:1], v[1:2]
                    v = uncond + g * (text - uncond)
                with timings.measure("scheduler"):
                    step_noise = None
                    if scheduler.needs_noise:
                        if noise is not None:
                            step_noise = noise[i]
                        elif rng is not None:
                            step_noise = rng.standard_normal(scheduler.noise_shape(x.shape), dtype=np.float32)
                    x = scheduler.step(v, i, x, step_noise)
                timings.add("step", time.perf_counter() - step_start)  # the caller's callback is not ours
                if callback is not None:
                    callback(i, t, _read_only(x))
                bar.update(1)
        finally:
            bar.close()

        with timings.measure("vae"):
            decoded = self.sessions["vae_decoder"].run({_single_input(self.sessions["vae_decoder"], "latent"): x})
        with timings.measure("postprocess"):
            array = _output(decoded, "image")[0].astype(np.float32, copy=False).transpose(1, 2, 0)
            image = _to_pil(array)
        timings.add("total", time.perf_counter() - t_start)
        return GenerationResult(
            image=image, array=array, seed=req["seed"], width=w, height=h, steps=scheduler.num_steps,
            guidance_scale=float(req["guidance_scale"]), prompt=prompt,
            negative_prompt=req["negative_prompt"] if cfg else None, timings=timings,
            latents=x if return_latents else None,
            info={"variant": self.variant.name, "scheduler": f"{type(scheduler).__name__} ({self.scheduler_flavour})",
                  "backend": self.backend.describe(), "cfg": cfg, "any_size": bool(any_size),
                  "notes": req["notes"], "loras": [r.to_dict() for r in loras]})

    def _check_request(self, prompt, negative_prompt, width, height, steps, guidance_scale, seed, any_size,
                       callback, latents, noise, allow_cfg=False) -> dict[str, Any]:
        """Every argument, checked before anything runs; returns the resolved request."""
        if not isinstance(prompt, str):
            raise RequestError(f"prompt must be a str, got {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise RequestError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1):
            raise RequestError(f"steps must be an integer >= 1, got {steps!r}")
        if guidance_scale is None:
            guidance_scale = self.variant.guidance_scale
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.integer, np.floating)) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise RequestError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        cfg = guidance_scale > 1.0
        notes = []  # what the request asked for and did not get as asked (reported, never silent)
        if cfg and not self.variant.uses_cfg:
            if not allow_cfg:
                raise RequestError(
                    f"guidance_scale={guidance_scale:g}: HiDream-I1-{self.variant.name.capitalize()} is guidance-"
                    f"distilled (its recipe runs no CFG); CFG would run the transformer on two rows per step for a "
                    f"model not trained for it; pass allow_cfg=True (--allow-cfg) to run it anyway")
            notes.append(f"CFG with guidance {guidance_scale:g} on the guidance-distilled {self.variant.name} variant "
                         f"(twice the transformer work per step)")
        if negative_prompt and not cfg:
            notes.append("negative prompt unused: it only acts through CFG (guidance > 1), and this run has none")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise RequestError(f"seed must be a non-negative integer or None, got {seed!r}")
        if callback is not None and not callable(callback):
            raise RequestError(f"callback must be callable, got {type(callback).__name__}")
        w, h = self.resolve_size(width, height, any_size)
        if (width or height) and (width or w, height or h) != (w, h):
            notes.append(f"size {width or w}x{height or h} rescaled to {w}x{h} (this model's area of "
                         f"{self.transformer_info.default_side}x{self.transformer_info.default_side} px, multiples of "
                         f"{SIZE_MULTIPLE}); --any-size keeps the size as given")

        info = self.transformer_info
        rows = 2 if cfg else 1
        if info.feed_batch(rows) > info.batch_range[1]:
            raise RequestError(f"this transformer runs batches of {info.batch_range[0]}..{info.batch_range[1]}; "
                             f"{'CFG' if cfg else 'one image'} needs {info.feed_batch(rows)}")
        scheduler = self.make_scheduler(None if steps is None else int(steps))

        shape = (1, info.in_channels, h // VAE_SCALE, w // VAE_SCALE)
        if latents is not None:
            arr = np.asarray(latents)
            if arr.shape != shape or arr.dtype.kind != "f":
                raise RequestError(f"latents must be a float array of shape {shape} for {w}x{h}, got "
                                 f"{arr.dtype} {arr.shape}")
        if noise is not None:
            if not scheduler.needs_noise:
                raise RequestError(f"the {self.variant.name} scheduler ({type(scheduler).__name__}) is deterministic; "
                                 f"it takes no noise")
            if len(noise) != scheduler.num_steps:
                raise RequestError(f"noise must hold one array per step ({scheduler.num_steps}), got {len(noise)}")
            want = scheduler.noise_shape(shape)
            for i, n in enumerate(noise):
                if n is not None and (np.shape(n) != want or np.asarray(n).dtype.kind != "f"):
                    raise RequestError(f"noise[{i}] must be a float array of shape {want}, got "
                                     f"{np.asarray(n).dtype} {np.shape(n)}")
        if seed is None and (latents is None or (scheduler.needs_noise and noise is None)):
            seed = secrets.randbits(63)  # reported in the result, so the image can be made again
        return {"scheduler": scheduler, "width": w, "height": h, "cfg": cfg, "guidance_scale": guidance_scale,
                "negative_prompt": "" if negative_prompt is None else negative_prompt,
                "seed": None if seed is None else int(seed), "notes": notes}

    def _progress_bar(self, total: int, progress: bool | None):
        enabled = self.progress if progress is None else progress
        if enabled is None:
            enabled = sys.stderr.isatty()
        if not enabled:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, desc=f"hidream-{self.variant.name}", unit="step", leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


# --- helpers ------------------------------------------------------------------------------------------

# Short names some manifest entries use for dtypes ("dtype": "fp32" at the component level).
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def _np_dtype(name: str) -> np.dtype:
    name = _DTYPE_ALIASES.get(name, name)
    try:
        return np.dtype(name)
    except TypeError:
        raise ManifestError(f"unknown dtype {name!r} in the transformer's manifest entry") from None


def _pad_rows(array: np.ndarray, axis: int, batch: int) -> np.ndarray:
    """Repeat the last row along ``axis`` up to ``batch`` rows (their outputs are discarded)."""
    rows = array.shape[axis]
    if rows == batch:
        return array
    extra = np.repeat(np.take(array, [rows - 1], axis=axis), batch - rows, axis=axis)
    return np.concatenate([array, extra], axis=axis)


def _output(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Output ``name`` of a session, or its only output whatever the graph calls it."""
    if name in outputs:
        return np.asarray(outputs[name])
    if len(outputs) == 1:
        return np.asarray(next(iter(outputs.values())))
    raise ManifestError(f"expected an output {name!r}, got {sorted(outputs)}")


def _read_only(array: np.ndarray) -> np.ndarray:
    """A view callbacks can look at but not write through (the sampler keeps using the array)."""
    view = array.view()
    view.flags.writeable = False
    return view


def _single_input(session: Session, default: str) -> str:
    names = list(session.input_names)
    return default if default in names or len(names) != 1 else names[0]


def _to_pil(array: np.ndarray):
    """float (H, W, 3) in [0, 1] -> PIL RGB, rounding like diffusers' numpy_to_pil."""
    from PIL import Image

    pixels = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels)  # (H, W, 3) uint8 is RGB
