"""Export HiDream-I1's four text encoders to ONNX: CLIP-L, CLIP-G, T5-XXL and Llama-3.1-8B-Instruct.

Each encoder is the library's own model (transformers), loaded from its checkpoint folder and wrapped in
a small module whose outputs are exactly what `HiDreamImagePipeline` takes from it, so
the runtime needs no model code, only the engine folder (engines/README.md):

    clip_l, clip_g  input_ids (batch, 128)                  -> text_embeds (batch, projection_dim)
    t5              input_ids, attention_mask (batch, 128)  -> last_hidden_state (batch, 128, d_model)
    llama           input_ids, attention_mask (batch, 128)  -> hidden_states (n_layers, batch, 128, hidden)

The batch is dynamic (prompts x [negative, positive]); the text length is fixed at 128 because the
pipeline always pads to it. Weights always go to external data (model.onnx + model.onnx.data), so the
16 GB Llama and a tiny test model take the same path.

`export_onnx` is the one ONNX writer of this module and of export/vae.py: dynamo exporter first (the
torch 2.13 default), the TorchScript exporter as a recorded fallback, then a single external-data file,
ONNX shape inference and the path-based `onnx.checker`. The functions here write into a folder the caller
owns; `hidream_export.build.pipeline` makes that atomic (temporary folder, then rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

from hidream_export.errors import ExportError
from hidream_export.export.common import (DATA_NAME, DEFAULT_OPSET, EXPORTERS, ONNX_NAME, Axis, check_saved,
                                          clear_dir, export_onnx, own_version, torch_dtype)
from hidream_export.signature import MAX_TEXT_BATCH, tensor_dtype
from hidream_export.variants import TEXT_LENGTH

log = logging.getLogger(__name__)

# Bumped whenever a wrapper below changes what it computes, so shared exports keyed on it are redone.
RECIPE_VERSION = 1
# Encoders exported by streaming by default (export_encoder's `streaming`): the large ones. CLIP is small.
STREAMING = frozenset({"t5", "llama"})

@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """One text encoder: where the HiDream model folder keeps it and what the pipeline takes from it."""

    name: str  # component name in the engine folder and manifest
    subfolder: str | None  # in the checkpoint; None = the separately passed Llama folder (--llama)
    model_class: str  # transformers class the pipeline loads
    description: str  # for messages
    uses_attention_mask: bool  # whether the pipeline passes the tokenizer's attention mask


ENCODERS: dict[str, EncoderSpec] = {
    "clip_l": EncoderSpec("clip_l", "text_encoder", "CLIPTextModelWithProjection", "CLIP-L text encoder", False),
    "clip_g": EncoderSpec("clip_g", "text_encoder_2", "CLIPTextModelWithProjection", "CLIP-G text encoder", False),
    "t5": EncoderSpec("t5", "text_encoder_3", "T5EncoderModel", "T5 text encoder", True),
    "llama": EncoderSpec("llama", None, "LlamaModel", "Llama-3.1 text encoder", True),
}


# ---- wrappers: exactly the tensors the pipeline uses ------------------------------------------------

def _wrappers():
    """Defined lazily so importing this module (e.g. for ENCODERS) does not import torch."""
    import torch

    class ClipTextEmbeds(torch.nn.Module):
        """CLIPTextModelWithProjection -> `text_embeds`, the projected pooled output (output[0]).

        HiDream's `_get_clip_prompt_embeds` passes input_ids only: no attention mask, so padding tokens are
        attended (they sit after the EOS, which causal attention hides from the pooled EOS position anyway)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids)[0]

    class T5LastHiddenState(torch.nn.Module):
        """T5EncoderModel -> `last_hidden_state` (padding positions included: the DiT attends to them)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]

    class LlamaHiddenStates(torch.nn.Module):
        """LlamaModel -> `torch.stack(hidden_states[1:])`, layer axis first: what the pipeline feeds the DiT.

        hidden_states[0] (the embeddings) is dropped; the last entry is the final-RMSNorm'd output of the last
        layer, as transformers returns it. LlamaModel rather than LlamaForCausalLM: the
        LM head (0.5 B parameters) is never used."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                             use_cache=False)
            return torch.stack(out.hidden_states[1:])

    return ClipTextEmbeds, T5LastHiddenState, LlamaHiddenStates


def load_config(name: str, folder: str | Path):
    """Encoder `name`'s config from its folder (cheap: what a build checks before any export starts)."""
    cls, _ = _encoder_class_and_kwargs(name)
    with _quiet_transformers():
        return cls.config_class.from_pretrained(str(folder))


def load_encoder(name: str, folder: str | Path, dtype: str = "fp32"):
    """Load encoder `name` from its folder and wrap it; returns (wrapped module in eval mode, its config)."""
    import transformers

    spec = _spec(name)
    tdtype = torch_dtype(dtype)
    clip, t5, llama = _wrappers()
    kwargs = {"dtype": tdtype}
    if name == "llama":
        # The pipeline calls Llama with output_attentions=True, which selects eager attention; export the
        # same math (for 128 tokens the cost is irrelevant).
        kwargs["attn_implementation"] = "eager"
    cls = getattr(transformers, spec.model_class)
    with _quiet_transformers():
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    # A weight the checkpoint lacks would be randomly initialised, and the export silently wrong (e.g. a
    # CLIPTextModel folder without text_projection). Unexpected keys are fine: Llama's unused lm_head.
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        raise ExportError(f"{folder}: the {spec.description} checkpoint does not fit {spec.model_class}: "
                          f"{len(missing)} missing or mismatched weights, e.g. {missing[:3]}")
    model.eval()
    wrapper = {"clip_l": clip, "clip_g": clip, "t5": t5, "llama": llama}[name]
    return wrapper(model).eval(), model.config


@contextlib.contextmanager
def _quiet_transformers():
    """from_pretrained prints a progress bar and a load report (Llama's unused lm_head shows as UNEXPECTED);
    the loading info is checked instead, so keep the console to the build's own lines."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ExportError(f"unknown text encoder {name!r}; expected one of {sorted(ENCODERS)}") from None


# ---- encoders --------------------------------------------------------------------------------------------

def encoder_io(name: str, config, dtype: str = "fp32") -> dict:
    """Inputs/outputs (named symbolic dims), axes and the model facts the manifest records for `name`."""
    out_dtype = tensor_dtype(dtype)
    ids = {"name": "input_ids", "dtype": "int64", "shape": ["batch", TEXT_LENGTH]}
    mask = {"name": "attention_mask", "dtype": "int64", "shape": ["batch", TEXT_LENGTH]}
    if name in ("clip_l", "clip_g"):
        facts = {"projection_dim": config.projection_dim, "hidden_size": config.hidden_size,
                 "num_layers": config.num_hidden_layers}
        inputs = [ids]
        outputs = [{"name": "text_embeds", "dtype": out_dtype, "shape": ["batch", config.projection_dim]}]
    elif name == "t5":
        facts = {"d_model": config.d_model, "num_layers": config.num_layers}
        inputs = [ids, mask]
        outputs = [{"name": "last_hidden_state", "dtype": out_dtype, "shape": ["batch", TEXT_LENGTH, config.d_model]}]
    else:
        facts = {"num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                 "attn_implementation": "eager", "last_is_final_norm": True}
        inputs = [ids, mask]
        outputs = [{"name": "hidden_states", "dtype": out_dtype,
                    "shape": [config.num_hidden_layers, "batch", TEXT_LENGTH, config.hidden_size]}]
    return {"inputs": inputs, "outputs": outputs, "axes": {"batch": [1, MAX_TEXT_BATCH]},
            "uses_attention_mask": _spec(name).uses_attention_mask, **facts}


def _sample_inputs(name: str, config) -> tuple:
    """Batch 2 (a batch of 1 would be specialised), random ids, and for masked encoders one full row and one
    right-padded row, as the tokenizer produces them."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, TEXT_LENGTH), generator=g)
    if not _spec(name).uses_attention_mask:
        return (ids,)
    mask = torch.ones(2, TEXT_LENGTH, dtype=torch.int64)
    mask[1, TEXT_LENGTH // 3:] = 0
    return ids, mask


def export_encoder(name: str, folder: str | Path, out_dir: str | Path, *, dtype: str = "fp32",
                   opset: int = DEFAULT_OPSET, exporter: str = "auto", streaming: bool | None = None,
                   quant=None) -> dict:
    """Export text encoder `name` ("clip_l", "clip_g", "t5", "llama") from its model folder into out_dir.

    Writes out_dir/model.onnx + model.onnx.data (out_dir should be a fresh folder: the caller makes the
    result atomic). Returns the manifest fields of the component except path/files/source.

    streaming=None (default) streams the large encoders (STREAMING: T5, Llama) when their weights are
    safetensors and the exporter is not "torchscript": the graph is traced on fake tensors and the weights
    copied one tensor at a time (export/streaming.py), so the 16 GB Llama is never held in memory.
    streaming=False is the plain path (load, then torch.onnx.export); streaming=True insists on streaming.
    With exporter "auto", a failing streaming export falls back to the plain path (recorded).
    quant (a hidream_export.quant QuantScheme, int8/int4): weight-only quantization of every linear layer,
    done while the weights stream (T5 and Llama only; embeddings stay in `dtype`)."""
    import onnx
    import torch
    import transformers

    t0 = time.perf_counter()
    folder = Path(folder)
    if streaming is None:
        streaming = name in STREAMING and exporter != "torchscript" and bool(_safetensors_files(folder))
    elif streaming and (name not in STREAMING or exporter == "torchscript"):
        raise ExportError(f"streaming export is for {sorted(STREAMING)} with the dynamo exporter, "
                          f"not {name!r} with {exporter!r}")
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r} is not one of {EXPORTERS}")
    if quant is not None and not streaming:
        raise ExportError(f"--quant-encoders quantizes while the weights stream: {name} must be one of "
                          f"{sorted(STREAMING)} with safetensors weights and the dynamo exporter")
    info: dict | None = None
    if streaming:
        try:
            config, info = _export_streaming(name, folder, Path(out_dir), dtype=dtype, opset=opset, quant=quant)
        except Exception as exc:  # noqa: BLE001 - "auto" falls back to the plain path, recorded
            if exporter != "auto" or quant is not None:
                raise
            line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log.warning("streaming export of %s failed (%s); retrying with the plain path", name, line)
            clear_dir(Path(out_dir))
            fallback, info = f"streaming: {line}", None
    if info is None:
        model, config = load_encoder(name, folder, dtype)
        args = _sample_inputs(name, config)
        batch = Axis("batch", 1, MAX_TEXT_BATCH)
        io = encoder_io(name, config, dtype)
        info = export_onnx(model, args, Path(out_dir), input_names=[i["name"] for i in io["inputs"]],
                           output_names=[o["name"] for o in io["outputs"]], dynamic=[{0: batch}] * len(args),
                           opset=opset, exporter=exporter)
        info["streaming"] = False
        if streaming:
            info.setdefault("exporter_fallback", fallback)
        del model
    io = encoder_io(name, config, dtype)
    return {
        "kind": "onnx",
        "dtype": dtype,
        **info,
        **io,
        "model_class": _spec(name).model_class,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "transformers": transformers.__version__,
                     "hidream_export": own_version()},
        "export_seconds": round(time.perf_counter() - t0, 2),
    }


# ---- streaming export (T5, Llama) ------------------------------------------------------------------------

def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained reads: the index's shards, else model.safetensors; [] if none."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"{index}: unreadable shard index ({exc})") from None
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _checkpoint_entries(folder: Path) -> dict:
    """Every tensor of the folder's safetensors files: file key -> TensorEntry (headers only)."""
    from hidream_export.model.checkpoint import read_header

    files = _safetensors_files(folder)
    if not files:
        raise ExportError(f"{folder}: streaming export needs safetensors weights (model.safetensors or an index)")
    entries: dict = {}
    for path in files:
        if not path.is_file():
            raise ExportError(f"{path}: shard listed in model.safetensors.index.json is missing")
        entries.update(read_header(path)[0])
    return entries


def _encoder_class_and_kwargs(name: str):
    import transformers

    spec = _spec(name)
    kwargs = {"attn_implementation": "eager"} if name == "llama" else {}  # as load_encoder
    return getattr(transformers, spec.model_class), kwargs


def trace_encoder_weightless(name: str, folder: str | Path, dtype: str = "fp32", opset: int = DEFAULT_OPSET):
    """Encoder `name` built from its config on fake tensors, wrapped as in the plain path and converted to ONNX
    (optimize=False). Returns (onnx program, config, fake wrapped module); no weight is allocated."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export import Dim

    cls, kwargs = _encoder_class_and_kwargs(name)
    tdtype = torch_dtype(dtype)
    with _quiet_transformers():
        config = cls.config_class.from_pretrained(str(folder))
    real_args = _sample_inputs(name, config)
    clip, t5, llama = _wrappers()
    wrapper = {"t5": t5, "llama": llama, "clip_l": clip, "clip_g": clip}[name]
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        # Module.to() cannot swap fake parameters: build directly in the export dtype instead.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(tdtype)
        try:
            with _quiet_transformers():
                model = cls._from_config(config, dtype=tdtype, **kwargs)
        finally:
            torch.set_default_dtype(previous)
        module = wrapper(model.eval()).eval()
        args = tuple(mode.from_tensor(a) for a in real_args)
        batch = Dim("batch", min=1, max=MAX_TEXT_BATCH)
        # As torch.onnx.export's own capture of a module (the plain path): non-strict, size-oblivious.
        with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
            program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args), strict=False)
    io = encoder_io(name, config, dtype)
    with torch.no_grad():  # the decompositions fail on T5's attention reshape with grad mode on
        onnx_program = torch.onnx.export(program, dynamo=True, optimize=False, verbose=False, opset_version=opset,
                                         input_names=[i["name"] for i in io["inputs"]],
                                         output_names=[o["name"] for o in io["outputs"]])
    return onnx_program, config, module


def encoder_initializer_map(names, module, entries: dict) -> dict[str, str]:
    """Each initializer name -> the checkpoint key it is read from, or "computed:<name>" for a non-persistent
    buffer (e.g. rotary `inv_freq`). Tied weights (T5's encoder.embed_tokens = shared) resolve through every
    name the tensor has in the module; the wrapper's "model." prefix and the base-model prefix (Llama's
    checkpoint is LlamaForCausalLM's, keys "model.layers...") are tried both ways."""
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    aliases: dict[int, list[str]] = {}
    for full, tensor in tensors:
        aliases.setdefault(id(tensor), []).append(full)
    by_name = {n: aliases[id(t)] for n, t in tensors}
    non_persistent = {f"{prefix}.{b}" if prefix else b for prefix, sub in module.named_modules()
                      for b in getattr(sub, "_non_persistent_buffers_set", ())}
    base = getattr(getattr(module, "model", None), "base_model_prefix", "") or ""
    mapping, unknown = {}, []
    for name in names:
        found = None
        for alias in by_name.get(name, [name]):
            key = alias[len("model."):] if alias.startswith("model.") else alias
            candidates = [key, f"{base}.{key}" if base else key]
            if base and key.startswith(base + "."):
                candidates.append(key[len(base) + 1:])
            found = next((c for c in candidates if c in entries), None)
            if found:
                break
        if found:
            mapping[name] = found
        elif name in non_persistent:
            mapping[name] = f"computed:{name}"
        else:
            unknown.append(name)
    if unknown:
        raise ExportError(f"traced encoder graph has initializers with no source in the checkpoint: {unknown[:5]}")
    return mapping


def _computed_buffer(module, name: str, dtype):
    """A non-persistent buffer's real value: the owning submodule rebuilt (outside fake mode) from its config,
    in the export dtype as the plain path builds it. Small modules only (rotary embeddings)."""
    import torch

    owner_path, _, buffer = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    config = getattr(owner, "config", None)
    if config is None:
        raise ExportError(f"cannot compute buffer {name!r}: its module {type(owner).__name__} has no config")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        real = type(owner)(config=config)
    finally:
        torch.set_default_dtype(previous)
    return getattr(real, buffer).detach().clone()


def _export_streaming(name: str, folder: Path, out_dir: Path, *, dtype: str, opset: int, quant=None):
    """Trace on fake tensors, weightless-optimize, lay out, save the graph, stream the weights from the
    folder's safetensors. Returns (config, info) where info has exporter/opset/streaming/initializer_map."""
    import onnx_ir as ir
    import torch

    from hidream_export.export import streaming
    from hidream_export.model.checkpoint import read_tensor_chunks

    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: not empty; export into a fresh folder")
    entries = _checkpoint_entries(folder)
    onnx_program, config, module = trace_encoder_weightless(name, folder, dtype, opset)
    names = streaming.weightless_optimize(onnx_program.model)
    mapping = encoder_initializer_map(names, module, entries)
    quantized, record = None, None
    if quant is not None:
        from hidream_export.quant import encoders as quant_encoders

        names, quantized, record = quant_encoders.quantize_encoder(onnx_program.model, names, mapping, entries, quant,
                                                                  dtype)
    slots = streaming.layout(onnx_program.model, names, DATA_NAME)
    onnx_path, data_path, journal = out_dir / ONNX_NAME, out_dir / DATA_NAME, out_dir / streaming.JOURNAL
    streaming.save_graph(onnx_program.model, onnx_path)
    del onnx_program
    torch_of = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
                ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.DOUBLE: torch.float64,
                ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32, ir.DataType.BOOL: torch.bool}
    slot_dtype = {s.name: torch_of[s.dtype] for s in slots if s.dtype in torch_of}  # quantized: QuantFetch
    tdtype = torch_dtype(dtype)

    def fetch(init: str):
        if quantized is not None and (found := quantized(init)) is not None:
            return streaming.TensorPieces(found[0], [found[1]])
        source = mapping[init]
        if source.startswith("computed:"):
            return _computed_buffer(module, init, tdtype).to(slot_dtype[init])
        entry = entries[source]
        # In pieces: Llama's 1 GiB embedding table is never held whole (nor its cast copy).
        return streaming.TensorPieces(entry.shape, pieces(entry, slot_dtype[init]))

    def pieces(entry, dtype):
        with open(entry.file, "rb") as fh:
            yield from read_tensor_chunks(fh, entry, dtype)

    streaming.stream_weights(data_path, slots, fetch, journal, desc=name)
    journal.unlink(missing_ok=True)
    if not data_path.exists():
        data_path.write_bytes(b"")
    check_saved(onnx_path)
    info = {"exporter": "dynamo", "opset": opset, "streaming": True, "initializer_map": mapping}
    if record is not None:
        info["quant"] = record
    return config, info
