"""How one Triton execution's requests run: each checked alone, then grouped by size into shared batches.

Triton's dynamic batcher hands the model several requests at once. `serve_batch` parses and checks each
one on its own (a bad request gets its own error; the others still run), groups the good ones by
resolved size in arrival order, cuts each group into runs whose transformer rows fit the engine's batch
range, and runs each as one `Pipeline.generate_batch`. An image's bytes do not depend on its batch
mates as long as the backend computes every batch row independently of the others: `batch_invariance`
checks that on the loaded folder, and `load_model` turns batching off where it does not hold (unless
told otherwise). Nothing here knows Triton; the Python-backend model (triton_model.py) is a thin shell
around it. Torch-free.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hidream_export.errors import HiDreamExportError, RequestError
from hidream_export.runtime.pipeline import GenerationRequest, GenerationResult, Pipeline
from hidream_export.runtime.report import Timings
from hidream_export.serve import protocol
from hidream_export.variants import VAE_SCALE

__all__ = ["BATCHING_MODES", "LoadedModel", "Outcome", "ServedBatch", "batch_invariance", "load_model",
           "plan_runs", "serve_batch"]

LOG = logging.getLogger(__name__)

# auto: batch when batch_invariance finds no difference; on: always; off: one image per run.
BATCHING_MODES = ("auto", "on", "off")


@dataclass
class LoadedModel:
    """A pipeline ready to serve, and whether its requests may share runs."""

    pipe: Pipeline
    batching: bool
    why: str  # one line for the log: how the batching decision was made
    lora_dir: Path | None = None  # the folder requests' `lora` names are files of; None: requests take none


@dataclass
class Outcome:
    """One request's answer: output arrays, or an error (`client_error`: the request was at fault)."""

    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    client_error: bool = False


@dataclass
class ServedBatch:
    outcomes: list[Outcome]
    timings: Timings  # every stage of every run once, plus parse and respond
    runs: list[int] = field(default_factory=list)  # images per generate_batch call


def load_model(folder: str, *, backend: Any = "ort", providers: Sequence[Any] | None = None,
               threads: int | None = None, verify: bool = True, scheduler_flavour: str = "diffusers",
               batching: str = "auto", io_binding: bool | None = None, lora_dir: str | Path | None = None
               ) -> LoadedModel:
    """Load and verify an engine folder, then decide whether requests may share runs. ``lora_dir``: the
    folder of LoRA files requests may name (their `lora` input)."""
    if batching not in BATCHING_MODES:
        raise RequestError(f"batching {batching!r} is not one of {list(BATCHING_MODES)}")
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise RequestError(f"--lora-dir {lora_dir}: not a folder")
    pipe = Pipeline.from_dir(folder, backend=backend, providers=providers, threads=threads, verify=verify,
                             scheduler_flavour=scheduler_flavour, progress=False, io_binding=io_binding)
    lora_dir = None if lora_dir is None else Path(lora_dir)
    if batching != "auto":
        return LoadedModel(pipe, batching == "on", f"batching {batching} (as configured)", lora_dir)
    differ = batch_invariance(pipe)
    if differ:
        return LoadedModel(pipe, False, f"batching off: batched rows of {', '.join(differ)} differ from unbatched ones "
                                        f"on {pipe.backend.describe()}, so a batch would change the images", lora_dir)
    return LoadedModel(pipe, True, f"batching on: batched and unbatched rows are bit-identical on "
                                   f"{pipe.backend.describe()}", lora_dir)


def batch_invariance(pipe: Pipeline, seed: int = 0) -> list[str]:
    """The components whose outputs for one input depend on what else is in the batch (empty: none).

    Runs the text encoders, the transformer (at the exported batch maximum, at its optimal size) and
    the VAE decoder on distinct random rows, once together and once row group by row group, and
    compares the results bit for bit. Costs one batch-maximum run of each plus the unbatched runs.
    """
    info = pipe.transformer_info
    rng = np.random.default_rng(seed)
    differ = []

    group = info.batch_multiple
    rows = info.batch_range[1] - info.batch_range[1] % group
    prompts = [f"batch probe {k}: {rng.integers(1 << 30)}" for k in range(rows)]
    together = pipe.text_encoders.encode(prompts)
    alone = [pipe.text_encoders.encode(prompts[k:k + 1]) for k in range(rows)]
    if not all(np.array_equal(together.take([k]).t5, a.t5) and np.array_equal(together.take([k]).llama, a.llama)
               and np.array_equal(together.take([k]).pooled, a.pooled) for k, a in enumerate(alone)):
        differ.append("text encoders")

    w, h = info.size_range.opt
    latent = (info.in_channels, h // VAE_SCALE, w // VAE_SCALE)
    x = rng.standard_normal((rows, *latent), dtype=np.float32)
    scheduler = pipe.make_scheduler()
    t = np.full((rows,), scheduler.timesteps[len(scheduler.timesteps) // 2], dtype=info.timestep_dtype)
    transformer = pipe.sessions["transformer"]

    def run(sl: slice) -> np.ndarray:
        return transformer.run({"hidden_states": x[sl], "timesteps": t[sl], "encoder_hidden_states_t5": together.t5[sl],
                                "encoder_hidden_states_llama3": together.llama[:, sl],
                                "pooled_embeds": together.pooled[sl]})["sample"]

    if rows > group:
        full = run(slice(0, rows))
        if not all(np.array_equal(full[k:k + group], run(slice(k, k + group))) for k in range(0, rows, group)):
            differ.append("transformer")

    vae = pipe.sessions["vae_decoder"]
    name = vae.input_names[0]
    limit = pipe.vae_batch_limit()
    if limit > 1:
        lat = x[:min(limit, rows)]
        full = next(iter(vae.run({name: lat}).values()))
        if not all(np.array_equal(full[k:k + 1], next(iter(vae.run({name: lat[k:k + 1]}).values())))
                   for k in range(len(lat))):
            differ.append("VAE decoder")
    return differ


def plan_runs(pipe: Pipeline, requests: Sequence[GenerationRequest], batching: bool,
              loras: Sequence[tuple] | None = None) -> list[list[int]]:
    """Indices of resolved requests per run: one size and one set of LoRAs (``loras[k]``, request k's) per
    run, in arrival order, transformer rows within the exported batch range (one request per run without
    batching). Runs with the same LoRAs come one after the other, so each set is switched to once."""
    info = pipe.transformer_info
    loras = loras if loras is not None else [()] * len(requests)
    runs: list[list[int]] = []
    open_runs: dict[tuple, tuple[list[int], int]] = {}  # (size, LoRAs) -> (run being filled, its rows)
    for k, request in enumerate(requests):
        rows = pipe.batch_rows(request)
        size = (request.width, request.height, loras[k])
        current = open_runs.get(size)
        if batching and current is not None and info.feed_batch(current[1] + rows) <= info.batch_range[1]:
            current[0].append(k)
            open_runs[size] = (current[0], current[1] + rows)
            continue
        run = [k]
        runs.append(run)
        open_runs[size] = (run, rows)
    first_seen = {}
    for run in runs:
        first_seen.setdefault(loras[run[0]], len(first_seen))
    return sorted(runs, key=lambda run: first_seen[loras[run[0]]])  # stable: arrival order within a set


def serve_batch(model: LoadedModel, arrays: Sequence[Mapping[str, np.ndarray | None]],
                wanted: Sequence[Sequence[str]] | None = None) -> ServedBatch:
    """Answer one execution's requests (input name -> array, absent inputs None); `wanted`: the outputs
    each request asked for (all when None), so an unwanted PNG is never encoded."""
    pipe = model.pipe
    timings = Timings()
    outcomes = [Outcome() for _ in arrays]
    resolved: list[GenerationRequest] = []
    loras: list[tuple] = []
    index: list[int] = []
    with timings.measure("parse"):
        for k, fields in enumerate(arrays):
            try:
                present = {n: a for n, a in fields.items() if a is not None}
                request = protocol.parse_request(present)
                request_loras = protocol.parse_loras(present)
                if request_loras and model.lora_dir is None:
                    raise RequestError("lora: this server takes no LoRAs (start it with --lora-dir DIR)")
                resolved.append(pipe.resolve_request(request))
                loras.append(request_loras)
                index.append(k)
            except RequestError as exc:
                outcomes[k] = Outcome(error=str(exc), client_error=True)
    runs = plan_runs(pipe, resolved, model.batching, loras)
    served = ServedBatch(outcomes, timings, [len(r) for r in runs])
    for run in runs:
        if model.lora_dir is not None:
            try:
                with timings.measure("loras"):
                    pipe.set_loras([(model.lora_dir / name, scale) for name, scale in loras[run[0]]])
            except HiDreamExportError as exc:  # a file missing, unreadable or not for this model: the request's
                for i in run:
                    outcomes[index[i]] = Outcome(error=f"lora: {exc}", client_error=True)
                continue
        try:
            results = pipe.generate_batch([resolved[i] for i in run], timings=timings)
        except HiDreamExportError as exc:  # checked above, so this is the folder or the backend failing
            LOG.error("a run of %d image(s) failed: %s", len(run), exc)
            for i in run:
                outcomes[index[i]] = Outcome(error=str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a bug: log its traceback, answer this run's requests, keep serving
            LOG.exception("a run of %d image(s) failed", len(run))
            for i in run:
                outcomes[index[i]] = Outcome(error=f"internal error: {type(exc).__name__}: {exc}")
            continue
        start = time.perf_counter()
        for i, result in zip(run, results):
            k = index[i]
            outcomes[k] = Outcome(outputs=_outputs(result, None if wanted is None else wanted[k]))
        timings.add("respond", time.perf_counter() - start)
    return served


def _outputs(result: GenerationResult, wanted: Sequence[str] | None) -> dict[str, np.ndarray]:
    outputs = protocol.encode_result(result, with_png=wanted is None or "png" in wanted)
    return outputs if wanted is None or not wanted else {n: a for n, a in outputs.items() if n in wanted}
