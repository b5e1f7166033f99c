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
import dataclasses
import math
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import BackendUnavailable, ManifestError, RequestError
from ..files import read_json_object
from ..manifest import Manifest, TokenizerComponent, TransformerComponent
from ..variants import SIZE_MULTIPLE, VAE_SCALE, SizeRange, Variant, default_size
from . import lora
from .backends import Backend, Session, get_backend
from .device import Device, DeviceArray, concat_rows
from .lora import AppliedLoras
from .report import Timings
from .schedulers import FLAVOURS, make_scheduler
from .text import ENCODERS, PromptTokenizer, TextEncoders

__all__ = ["GenerationRequest", "GenerationResult", "Pipeline", "TransformerInfo"]

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


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One image to make: the arguments of ``Pipeline.__call__`` as a record, for ``generate_batch``."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    any_size: bool = False
    return_latents: bool = False
    callback: Callable[[int, Any, np.ndarray], Any] | None = None
    latents: np.ndarray | None = None
    noise: Sequence[np.ndarray | None] | None = None
    allow_cfg: bool = False


@dataclass
class _Job:
    """A checked request on its way through the sampler: its own scheduler, generator and latents."""

    request: GenerationRequest
    checked: dict[str, Any]  # what _check_request resolved
    rng: np.random.Generator | None
    x: np.ndarray
    timings: Timings

    @property
    def scheduler(self):
        return self.checked["scheduler"]

    @property
    def prompts(self) -> list[str]:
        """Its transformer rows' prompts: [negative, positive] with CFG."""
        cfg = self.checked["cfg"]
        return [self.checked["negative_prompt"], self.request.prompt] if cfg else [self.request.prompt]


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
                 loras: AppliedLoras | None = None, device: Device | None = None):
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
        # Where the sampling loop keeps latents, text embeddings and timesteps (I/O binding); None: host arrays.
        self.device = device
        self.make_scheduler(1)  # an unsupported scheduler config fails now, not at the first image

    # --- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, folder: str | Path, backend: str | Backend = "ort", providers: Sequence[Any] | None = None,
                 scheduler_flavour: str = "diffusers", *, threads: int | None = None, verify: bool = True,
                 progress: bool | None = None, loras: Sequence[Any] = (), io_binding: bool | None = None
                 ) -> "Pipeline":
        """Load an engine folder written by ``hidream-export build``.

        The manifest is read and checked first (missing, newer format, missing files, hash
        mismatches: ManifestError naming the file), then tokenizers and one backend session per
        model component are loaded. ``verify=False`` skips the SHA-256 pass (files must still exist
        with their recorded sizes), which matters for the real model's ~60 GB of weights.
        ``providers``/``threads`` configure the "ort" backend. ``scheduler_flavour``: "diffusers"
        (default, what the HF folders configure) or "official" (the HiDream-I1 repository's).
        ``loras``: LoRA files applied to the transformer at load time, as paths or (path, scale) pairs
        (see ``set_loras``); the folder's files are not changed. ``io_binding``: keep the sampling loop's
        tensors on the first provider's device (CUDA or CPU) through ONNX Runtime's I/O binding, so no step
        copies latents, text embeddings or timesteps through the host; None (default): on where the ort
        backend's first provider is CUDA. On the CPU provider, where host and device memory are one, it gives
        the host loop's images bit for bit and costs about a millisecond per step (its one-operator graphs).
        """
        if scheduler_flavour not in FLAVOURS:
            raise RequestError(f"unknown scheduler flavour {scheduler_flavour!r}; expected one of {list(FLAVOURS)}")
        timings = Timings()
        start = time.perf_counter()
        folder = Path(folder)
        manifest = Manifest.read(folder)
        components = manifest.components
        backend = get_backend(backend, providers=providers, threads=threads)
        device = _io_device(backend, io_binding)

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
                   scheduler_flavour, progress, timings, update.applied if update else None, device)

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
        request = GenerationRequest(prompt, negative_prompt, width, height, steps, guidance_scale, seed, any_size,
                                    return_latents, callback, latents, noise, allow_cfg)
        with self._lock:
            return self._generate([request], progress)[0]

    def generate_batch(self, requests: Sequence[GenerationRequest], *, progress: bool | None = None,
                       timings: Timings | None = None) -> list[GenerationResult]:
        """Generate several images of one size in shared transformer and VAE batches.

        Each request keeps its own seeded generator, scheduler and latents, so its image is the one
        ``__call__`` makes with the same arguments whenever the backend computes each batch row
        independently of the others (ONNX Runtime's CPU provider does, bit for bit;
        ``hidream_export.serve.batching.batch_invariance`` checks a loaded folder). Requests may
        differ in prompt, seed, steps and guidance (each row is fed its own timestep; a request that
        needs fewer steps leaves the batch early). They must resolve to one size, and their
        transformer rows (two per image with CFG) must fit the exported batch range. Results come back
        in request order; each one's timings hold the shared stages it waited for. ``timings``, when
        given, receives every stage of the batch once (for metrics).
        """
        requests = list(requests)
        if not requests:
            return []
        with self._lock:
            return self._generate(requests, progress, timings)

    def resolve_request(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` checked, with its size, steps, guidance, negative prompt and seed made explicit (a
        random seed is drawn now when it has none), or RequestError. Resolved requests of one
        (width, height) can share a ``generate_batch``; each makes the image that the original request
        makes with the resolved seed."""
        checked = self._check_request(request)
        return dataclasses.replace(
            request, width=checked["width"], height=checked["height"], any_size=True,
            steps=checked["scheduler"].num_steps, guidance_scale=checked["guidance_scale"],
            negative_prompt=checked["negative_prompt"] if checked["cfg"] else request.negative_prompt,
            seed=checked["seed"])

    def batch_rows(self, request: GenerationRequest) -> int:
        """Transformer rows one image of ``request`` takes: two with CFG, else one."""
        guidance = self.variant.guidance_scale if request.guidance_scale is None else request.guidance_scale
        return 2 if guidance > 1.0 else 1

    def _generate(self, requests: list[GenerationRequest], progress: bool | None,
                  batch_timings: Timings | None = None) -> list[GenerationResult]:
        t_start = time.perf_counter()
        jobs = [self._start_job(k, request, len(requests)) for k, request in enumerate(requests)]
        self._check_batch(jobs)
        if batch_timings is not None:
            batch_timings.add("validate", sum(j.timings.total("validate") for j in jobs))
        everyone = [j.timings for j in jobs] + ([batch_timings] if batch_timings is not None else [])
        w, h = jobs[0].checked["width"], jobs[0].checked["height"]

        prompts = [p for j in jobs for p in j.prompts]
        encoded = Timings()
        cond = self.text_encoders.encode(prompts, encoded, stacklevel=4)  # warnings point at the caller
        for t in everyone:
            t.extend(encoded)
        starts = np.cumsum([0] + [len(j.prompts) for j in jobs])  # each job's rows in `cond`
        transformer = self.sessions["transformer"]
        loras = [r.to_dict() for r in self.loras.records]
        device = self.device
        if device is not None:
            for job in jobs:
                job.x = device.upload(job.x)
        num_steps = max(j.scheduler.num_steps for j in jobs)
        # The inputs that do not change between steps: text rows per set of active jobs, and each step's
        # timesteps, made (and on the device, uploaded) once before the loop.
        text_feeds: dict[tuple[int, ...], dict[str, Any]] = {}
        timestep_feeds = []
        for i in range(num_steps):
            active = tuple(k for k, j in enumerate(jobs) if i < j.scheduler.num_steps)
            if active not in text_feeds:
                rows = [r for k in active for r in range(starts[k], starts[k + 1])]
                text_feeds[active] = self._upload(self._text_feeds(cond if len(rows) == len(prompts)
                                                                   else cond.take(rows)))
            batch = self.transformer_info.feed_batch(sum(len(jobs[k].prompts) for k in active))
            timestep_feeds.append(self._upload({"timesteps": self._timestep_feed([jobs[k] for k in active], i,
                                                                                 batch)}))

        bar = self._progress_bar(num_steps, progress)
        try:
            for i in range(num_steps):
                step_start = time.perf_counter()
                active = tuple(k for k, j in enumerate(jobs) if i < j.scheduler.num_steps)
                feeds = {"hidden_states": self._latent_feed([jobs[k] for k in active]), **timestep_feeds[i],
                         **text_feeds[active]}
                call_start = time.perf_counter()
                out = transformer.run(feeds) if device is None else transformer.run_bound(feeds, device)
                _add("transformer", time.perf_counter() - call_start, [everyone[k] for k in active], batch_timings)
                # The model predicts -velocity; the schedulers take the velocity. Rows past the jobs'
                # own are batch padding.
                sample = _output(out, "sample")
                offset = 0
                for k in active:
                    job = jobs[k]
                    n = len(job.prompts)
                    v = -sample[offset:offset + n].astype(np.float32, copy=False)
                    offset += n
                    if job.checked["cfg"]:
                        uncond, text = v[0:1], v[1:2]
                        v = uncond + np.float32(job.checked["guidance_scale"]) * (text - uncond)
                    with job.timings.measure("scheduler"):
                        job.x = self._scheduler_step(job, v, i)
                    if batch_timings is not None:
                        batch_timings.add("scheduler", job.timings.values("scheduler")[-1])
                # The callers' callbacks are not ours: a step ends before them.
                _add("step", time.perf_counter() - step_start, [everyone[k] for k in active], batch_timings)
                for k in active:
                    if jobs[k].request.callback is not None:
                        jobs[k].request.callback(i, jobs[k].scheduler.timesteps[i], _read_only(_host(jobs[k].x)))
                bar.update(1)
        finally:
            bar.close()

        vae = self.sessions["vae_decoder"]
        arrays = []
        chunk = self.vae_batch_limit()
        for first in range(0, len(jobs), chunk):
            part = jobs[first:first + chunk]
            vae_start = time.perf_counter()
            latents = {_single_input(vae, "latent"): _concat([j.x for j in part])}
            decoded = vae.run(latents) if device is None else vae.run_bound(latents, device)
            images = _host(_output(decoded, "image"))  # the one copy to the host: the images themselves
            _add("vae", time.perf_counter() - vae_start, [j.timings for j in part], batch_timings)
            arrays.extend(images[k] for k in range(len(part)))
        for job in jobs:
            job.x = _host(job.x)

        results = []
        for job, decoded_image in zip(jobs, arrays):
            with job.timings.measure("postprocess"):
                array = decoded_image.astype(np.float32, copy=False).transpose(1, 2, 0)
                image = _to_pil(array)
            if batch_timings is not None:
                batch_timings.add("postprocess", job.timings.values("postprocess")[-1])
            job.timings.add("total", time.perf_counter() - t_start)
            req, checked = job.request, job.checked
            results.append(GenerationResult(
                image=image, array=array, seed=checked["seed"], width=w, height=h, steps=job.scheduler.num_steps,
                guidance_scale=float(checked["guidance_scale"]), prompt=req.prompt,
                negative_prompt=checked["negative_prompt"] if checked["cfg"] else None, timings=job.timings,
                latents=job.x if req.return_latents else None,
                info={"variant": self.variant.name,
                      "scheduler": f"{type(job.scheduler).__name__} ({self.scheduler_flavour})",
                      "backend": self.backend.describe(), "cfg": checked["cfg"], "any_size": bool(req.any_size),
                      "notes": checked["notes"], "loras": loras, "batch_images": len(jobs)}))
        if batch_timings is not None:
            batch_timings.add("total", time.perf_counter() - t_start)
        return results

    def _text_feeds(self, cond: Any) -> dict[str, np.ndarray]:
        """The transformer's text inputs for the active jobs' rows, padded up to a batch the engine runs."""
        batch = self.transformer_info.feed_batch(cond.batch)
        return {
            "encoder_hidden_states_t5": _pad_rows(cond.t5, 0, batch),
            "encoder_hidden_states_llama3": _pad_rows(cond.llama, 1, batch),  # layer-first: the batch is axis 1
            "pooled_embeds": _pad_rows(cond.pooled, 0, batch),
        }

    def _timestep_feed(self, active: list[_Job], i: int, batch: int) -> np.ndarray:
        """Step i's timestep per row: each active job's own, once per prompt, then padding."""
        dtype = self.transformer_info.timestep_dtype
        rows = [np.full((len(j.prompts),), j.scheduler.timesteps[i], dtype=dtype) for j in active]
        return _pad_rows(_concat(rows), 0, batch)

    def _latent_feed(self, active: list[_Job]) -> Any:
        """The active jobs' latents, once per prompt (the CFG pair is one batch), then padding; on the
        device when the loop runs there."""
        batch = self.transformer_info.feed_batch(sum(len(j.prompts) for j in active))
        return _pad_rows(_concat([_repeat_rows(j.x, len(j.prompts)) for j in active]), 0, batch)

    def _upload(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        return feeds if self.device is None else {k: self.device.upload(v) for k, v in feeds.items()}

    def _start_job(self, k: int, request: GenerationRequest, count: int) -> _Job:
        """Check one request and draw its initial latents."""
        timings = Timings()
        with timings.measure("validate"):
            try:
                checked = self._check_request(request)
            except RequestError as exc:
                if count == 1:
                    raise
                raise RequestError(f"requests[{k}]: {exc}") from None
        info = self.transformer_info
        shape = (1, info.in_channels, checked["height"] // VAE_SCALE, checked["width"] // VAE_SCALE)
        # One generator for everything random, in a fixed order: initial latents, then per step.
        # The latents are drawn even when injected, so step k's noise depends on the seed alone.
        rng = np.random.Generator(np.random.PCG64(checked["seed"])) if checked["seed"] is not None else None
        drawn = rng.standard_normal(shape, dtype=np.float32) if rng is not None else None
        x = np.array(request.latents, dtype=np.float32) if request.latents is not None else drawn
        return _Job(request, checked, rng, x, timings)

    def _check_batch(self, jobs: list[_Job]) -> None:
        """A batch runs one size, within the transformer's batch range."""
        size = (jobs[0].checked["width"], jobs[0].checked["height"])
        for k, job in enumerate(jobs):
            if (job.checked["width"], job.checked["height"]) != size:
                raise RequestError(f"requests[{k}] resolves to {job.checked['width']}x{job.checked['height']}, "
                                   f"requests[0] to {size[0]}x{size[1]}; one batch runs one size")
        info = self.transformer_info
        rows = sum(len(j.prompts) for j in jobs)
        if info.feed_batch(rows) > info.batch_range[1]:
            raise RequestError(f"{len(jobs)} images need {rows} transformer rows; this transformer runs batches of "
                               f"{info.batch_range[0]}..{info.batch_range[1]}")

    def _scheduler_step(self, job: _Job, v: np.ndarray, i: int) -> np.ndarray:
        scheduler = job.scheduler
        step_noise = None
        if scheduler.needs_noise:
            if job.request.noise is not None:
                step_noise = job.request.noise[i]
            elif job.rng is not None:
                step_noise = job.rng.standard_normal(scheduler.noise_shape(job.x.shape), dtype=np.float32)
            if step_noise is not None and self.device is not None:
                # Drawn on the host by the request's generator, so a seed gives one image on every provider.
                step_noise = self.device.upload(np.asarray(step_noise, dtype=np.float32))
        return scheduler.step(v, i, job.x, step_noise)

    def vae_batch_limit(self) -> int:
        """Latents decoded per VAE call: the exported batch axis' maximum (1 when it is not recorded)."""
        entry = self.manifest.components.get(self.backend.component_key(self.manifest, "vae_decoder"))
        axes = getattr(entry, "axes", None) or {}
        return max(1, int(axes.get("batch", (1, 1))[1]))

    def _check_request(self, request: GenerationRequest) -> dict[str, Any]:
        """Every argument, checked before anything runs; returns the resolved request."""
        prompt, negative_prompt, steps = request.prompt, request.negative_prompt, request.steps
        guidance_scale, seed, callback = request.guidance_scale, request.seed, request.callback
        latents, noise = request.latents, request.noise
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
            if not request.allow_cfg:
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
        w, h = self.resolve_size(request.width, request.height, request.any_size)
        if (request.width or request.height) and (request.width or w, request.height or h) != (w, h):
            notes.append(f"size {request.width or w}x{request.height or h} rescaled to {w}x{h} (this model's area of "
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


def _concat(arrays: list[Any]) -> Any:
    """Rows of several jobs along axis 0 (one job's array as it is), on the host or on the device."""
    if isinstance(arrays[0], DeviceArray):
        return concat_rows(arrays)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def _repeat_rows(array: Any, n: int) -> Any:
    """A one-row array's row n times (the latents once per prompt of a CFG pair)."""
    if isinstance(array, DeviceArray):
        return array.repeat_rows(n)
    return np.repeat(array, n, axis=0) if n > 1 else array


def _host(array: Any) -> np.ndarray:
    return array.numpy() if isinstance(array, DeviceArray) else array


def _io_device(backend: Backend, io_binding: bool | None) -> Device | None:
    """The Device the sampling loop binds its tensors on: the ort backend's first provider's when
    ``io_binding`` is True, or None and that device is a GPU; None for the host loop (an error if
    I/O binding was asked for and the backend has none)."""
    if io_binding is False:
        return None
    make = getattr(backend, "device", None)
    if make is None:
        if io_binding:
            raise BackendUnavailable(f"io_binding=True: the {backend.describe()} backend has no I/O binding; it is "
                                     f"ONNX Runtime's (backend='ort')")
        return None
    try:
        device = make()
    except BackendUnavailable:
        if io_binding:
            raise
        return None  # a provider I/O binding does not cover (e.g. TensorRT's EP first): the host loop
    # On the CPU provider the host arrays already are where the sessions compute: binding them only adds
    # the one-operator graphs' overhead, so by default the CPU runs the host loop.
    return device if io_binding or device.device_type != "cpu" else None


def _add(stage: str, seconds: float, timings: Sequence[Timings], batch: Timings | None = None) -> None:
    """One shared stage's duration, recorded for every job that waited for it and once for the batch."""
    for t in timings:
        t.add(stage, seconds)
    if batch is not None:
        batch.add(stage, seconds)


def _pad_rows(array: Any, axis: int, batch: int) -> Any:
    """Repeat the last row along ``axis`` up to ``batch`` rows (their outputs are discarded)."""
    rows = array.shape[axis]
    if rows == batch:
        return array
    if isinstance(array, DeviceArray):  # the latents, axis 0
        return concat_rows([array, array[rows - 1:rows].repeat_rows(batch - rows)])
    extra = np.repeat(np.take(array, [rows - 1], axis=axis), batch - rows, axis=axis)
    return np.concatenate([array, extra], axis=axis)


def _output(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Output ``name`` of a session, or its only output whatever the graph calls it."""
    if name in outputs:
        value = outputs[name]
    elif len(outputs) == 1:
        value = next(iter(outputs.values()))
    else:
        raise ManifestError(f"expected an output {name!r}, got {sorted(outputs)}")
    return value if isinstance(value, DeviceArray) else np.asarray(value)


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
