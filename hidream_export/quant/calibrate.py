"""`hidream-export calibrate`: activation ranges for `--quant fp8`, measured with NVIDIA ModelOpt.

    hidream-export calibrate CKPT --variant dev --prompts prompts.txt --out amax.json [--size 1024x1024]

1. Every prompt (one per line) is encoded by the model folder's own text encoders, run by diffusers'
   `HiDreamImagePipeline.encode_prompt` (the reference for what the transformer receives), negative prompt ""
   as well when the variant uses CFG. The encoders are then freed.
2. The PyTorch reference transformer (`gather` lowering: each expert sees only the tokens routed to it, as in
   the deployed graph) gets ModelOpt quantizers (`mtq.quantize` with FP8_DEFAULT_CFG, the groups
   quant/policy.py keeps in the export dtype disabled) and runs the variant's whole sampling trajectory per
   prompt: its scheduler, its steps (or --steps), CFG for Full, seeded latents and re-noise draws.
   ModelOpt's max calibration records each linear layer's largest |input| (`mtq.calibrate` per prompt).
3. amax.json keeps, per linear layer, the largest amax over all prompts, and the checkpoint's sha256 (the
   hash the export computes): `export --quant fp8` refuses ranges measured on another checkpoint.

Resumable: after each prompt the running maxima go to `<out>.partial` (written atomically); a rerun with
the same checkpoint, prompts and settings continues after the last finished prompt. Progress: one bar over
prompts x steps on a terminal.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hidream_export.errors import ExportError
from hidream_export.files import atomic_write_json, sha256_files
from hidream_export.quant.policy import TRANSFORMER_KEPT, transformer_quantizes
from hidream_export.quant.scheme import CALIBRATION_FORMAT, CalibrationTable, module_of
from hidream_export.variants import VAE_SCALE, get_variant, parse_size

PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class CalibrationOptions:
    checkpoint: Path  # a HiDream-I1 model folder (transformer + text encoders, diffusers layout)
    variant: str
    prompts: Path  # one prompt per line
    out: Path  # amax.json
    llama: Path | None = None  # Meta-Llama-3.1-8B-Instruct folder (default CHECKPOINT/llama)
    size: str | None = None  # WxH px (default: the model's default area, 1024x1024 for the real model)
    steps: int | None = None  # default: the variant's recipe
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    progress: bool | None = None  # None: on a terminal


def read_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"--prompts {path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ExportError(f"--prompts {path}: not UTF-8 text (one prompt per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ExportError(f"--prompts {path}: no prompts (expected one prompt per line)")
    return prompts


def modelopt_config() -> dict:
    """ModelOpt's FP8 config with the groups the export keeps in its dtype switched off."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    for group in TRANSFORMER_KEPT:
        for pattern in group.patterns:
            module = pattern.removesuffix(".weight").removesuffix(".*")
            config["quant_cfg"].append({"quantizer_name": f"*{module.strip('*')}*", "enable": False})
    return config


def calibrate(options: CalibrationOptions) -> CalibrationTable:
    """Run the calibration (resuming a partial one with the same settings); write and return amax.json."""
    import torch

    from hidream_export.export.common import model_errors
    from hidream_export.model.checkpoint import load_transformer, locate_checkpoint

    variant = get_variant(options.variant)
    prompts = read_prompts(options.prompts)
    with model_errors():
        ckpt = locate_checkpoint(options.checkpoint, None)
    checkpoint_sha256 = sha256_files(ckpt.files + ([ckpt.config_file] if ckpt.config_file else []))
    cfg = ckpt.config
    side = cfg.max_resolution[0] * VAE_SCALE  # the model's default area (1024 px for the real model)
    width, height = parse_size(options.size) if options.size else (side, side)
    steps = options.steps or variant.steps
    if options.dtype not in ("fp32", "bf16", "fp16"):
        raise ExportError(f"--dtype {options.dtype!r} is not one of fp32, bf16, fp16")
    meta = {"variant": variant.name, "prompts": len(prompts),
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "size": [width, height],
            "steps": steps, "seed": options.seed, "dtype": options.dtype, "tool": _versions()}
    partial_path = options.out.with_name(options.out.name + PARTIAL_SUFFIX)
    amax, done = _resume(partial_path, checkpoint_sha256, meta)

    if done < len(prompts):
        tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[options.dtype]
        cond = _encode(options, variant, prompts[done:], tdtype)
        with model_errors():
            model = load_transformer(options.checkpoint, dtype=tdtype, moe_lowering="gather", rope_dtype="float64")
        model = model.to(options.device).eval()
        bar = _bar(options.progress, (len(prompts) - done) * steps)
        try:
            _instrument(model, lambda m: _trajectory(m, cond[0], variant, steps, width, height,
                                                     options.seed + done, options.device, bar))
            for k, i in enumerate(range(done, len(prompts))):
                if k:
                    _recalibrate(model, lambda m: _trajectory(m, cond[k], variant, steps, width, height,
                                                              options.seed + i, options.device, bar))
                for module, value in _input_amax(model).items():
                    amax[module] = max(amax.get(module, 0.0), value)
                atomic_write_json(partial_path, {"checkpoint_sha256": checkpoint_sha256, "meta": meta,
                                                 "done": i + 1, "amax": amax})
        finally:
            bar.close()
    missing = sorted(module_of(k) for k in ckpt.entries if transformer_quantizes(k) and len(ckpt.entries[k].shape) == 2
                     and module_of(k) not in amax)
    if missing:
        raise ExportError(f"calibration saw no input for {len(missing)} linear layers (e.g. {missing[0]}): no "
                          f"token was routed to them; add prompts or steps")
    table = CalibrationTable(amax, checkpoint_sha256, meta)
    atomic_write_json(options.out, table.to_dict())
    partial_path.unlink(missing_ok=True)
    return CalibrationTable.read(options.out)


def _versions() -> dict:
    import modelopt
    import torch

    from hidream_export.export.common import own_version

    return {"hidream_export": own_version(), "nvidia-modelopt": modelopt.__version__, "torch": torch.__version__,
            "format": CALIBRATION_FORMAT}


def _resume(path: Path, checkpoint_sha256: str, meta: dict) -> tuple[dict[str, float], int]:
    """The running maxima and prompts done of a partial run with the same checkpoint and settings."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, 0
    if not isinstance(state, dict) or state.get("checkpoint_sha256") != checkpoint_sha256 or \
            state.get("meta") != json.loads(json.dumps(meta)):
        return {}, 0
    return {str(k): float(v) for k, v in state.get("amax", {}).items()}, int(state.get("done", 0))


def _encode(options: CalibrationOptions, variant, prompts: list[str], dtype) -> list[tuple]:
    """Per prompt: (t5, llama, pooled) as the transformer takes them, negative rows first under CFG."""
    import torch
    from diffusers import HiDreamImagePipeline
    from transformers import AutoTokenizer, LlamaForCausalLM

    from hidream_export.build.pipeline import resolve_llama

    llama = resolve_llama(options.checkpoint, options.llama)
    try:
        tokenizer_4 = AutoTokenizer.from_pretrained(llama)
        text_encoder_4 = LlamaForCausalLM.from_pretrained(llama, output_hidden_states=True, output_attentions=True,
                                                          torch_dtype=dtype)
        pipe = HiDreamImagePipeline.from_pretrained(options.checkpoint, transformer=None, vae=None,
                                                    tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4,
                                                    torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{options.checkpoint}: cannot load the text encoders ({' '.join(str(exc).split())[:200]})"
                          ) from None
    pipe.to(options.device)
    cfg = variant.guidance_scale > 1
    out = []
    with torch.no_grad():
        for prompt in prompts:
            t5, neg_t5, llama_embeds, neg_llama, pooled, neg_pooled = pipe.encode_prompt(
                prompt=[prompt], do_classifier_free_guidance=cfg, negative_prompt=[""] if cfg else None,
                max_sequence_length=128, device=torch.device(options.device), dtype=dtype)
            if cfg:
                t5, llama_embeds, pooled = (torch.cat([neg_t5, t5]), torch.cat([neg_llama, llama_embeds], dim=1),
                                            torch.cat([neg_pooled, pooled]))
            out.append((t5, llama_embeds, pooled))
    del pipe, text_encoder_4
    return out


def _trajectory(model, cond: tuple, variant, steps: int, width: int, height: int, seed: int, device: str, bar) -> None:
    """One image's sampling loop (the runtime's: numpy scheduler, one generator for latents and re-noise)."""
    import torch

    from hidream_export.runtime.schedulers import make_scheduler

    t5, llama, pooled = cond
    dtype = t5.dtype
    rows = t5.shape[0]
    scheduler = make_scheduler(variant, num_steps=steps)
    rng = np.random.Generator(np.random.PCG64(seed))
    x = rng.standard_normal((1, model.config.in_channels, height // VAE_SCALE, width // VAE_SCALE), dtype=np.float32)
    g = np.float32(variant.guidance_scale)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            latents = torch.from_numpy(np.repeat(x, rows, axis=0)).to(device, dtype)
            timesteps = torch.from_numpy(np.full((rows,), t, dtype=np.dtype(variant.timestep_dtype))).to(device)
            v = -model(latents, timesteps, t5, llama, pooled).float().cpu().numpy()
            if rows > 1:
                v = v[0:1] + g * (v[1:2] - v[0:1])
            noise = rng.standard_normal(scheduler.noise_shape(x.shape), dtype=np.float32) \
                if scheduler.needs_noise else None
            x = scheduler.step(v, i, x, noise)
            bar.update(1)


def _instrument(model, forward_loop) -> None:
    """Insert ModelOpt's quantizers and calibrate them over the first prompt."""
    import modelopt.torch.quantization as mtq

    mtq.quantize(model, modelopt_config(), forward_loop)


def _recalibrate(model, forward_loop) -> None:
    import modelopt.torch.quantization as mtq

    mtq.calibrate(model, algorithm="max", forward_loop=forward_loop)


def _input_amax(model) -> dict[str, float]:
    """Each quantized linear layer's calibrated input amax (module path = checkpoint key without .weight)."""
    out = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "input_quantizer", None)
        if quantizer is None or not quantizer.is_enabled or getattr(quantizer, "amax", None) is None:
            continue
        if transformer_quantizes(f"{name}.weight"):
            out[name] = float(quantizer.amax.float().max())
    return out


def _bar(progress: bool | None, total: int):
    show = sys.stderr.isatty() if progress is None else progress

    class _Quiet:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    if not show:
        return _Quiet()
    from tqdm import tqdm

    return tqdm(total=total, desc="calibrate", unit="step", file=sys.stderr)
