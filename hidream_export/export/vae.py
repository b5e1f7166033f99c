"""Export the VAE decoder (diffusers' AutoencoderKL, the FLUX VAE) to ONNX: sampler latent -> image in [0, 1].

The graph does the pipeline's whole decode step, so the runtime hands it the sampler's
raw latent and gets pixels back, with no VAE constants of its own to get wrong:

    image = (vae.decode(latent / scaling_factor + shift_factor) * 0.5 + 0.5).clamp(0, 1)

`scaling_factor` and `shift_factor` come from the VAE's config.json (0.3611 / 0.1159 for FLUX) and are
recorded in the manifest. Batch, latent height and latent width are dynamic (one file serves every size
and both CFG layouts); only the decoder's weights end up in the graph. Always fp32: the FLUX VAE config
asks for upcasting (`force_upcast`), and the decoder is a small share of the run time.
"""

from __future__ import annotations

import time
from pathlib import Path

from hidream_export.errors import ExportError
from hidream_export.export.common import DEFAULT_OPSET, Axis, export_onnx, model_source_files, own_version
from hidream_export.signature import MAX_VAE_BATCH
from hidream_export.variants import VAE_SCALE

# Latent sizes the decoder graph accepts: 64..2048 px, wider than any variant's range (512..1360 px for the
# real model, smaller for tiny test models), so the one shared export serves all of them.
LATENT_MIN, LATENT_MAX = 8, 256
RECIPE_VERSION = 1  # bumped whenever DecodeToImage changes what it computes

__all__ = ["export_vae_decoder", "load_vae_decoder", "vae_source_files", "LATENT_MIN", "LATENT_MAX"]


def vae_source_files(folder: str | Path) -> list[Path]:
    return model_source_files(Path(folder), "VAE")


def load_config(folder: str | Path) -> dict:
    """The AutoencoderKL config in `folder` (what a build checks before any export starts)."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(str(folder))
    if config.get("scaling_factor") is None:
        raise ExportError(f"{folder}/config.json: no scaling_factor")
    return config


def load_vae_decoder(folder: str | Path):
    """The AutoencoderKL in `folder`, wrapped so one call goes from sampler latent to [0, 1] image.

    Returns (module in eval mode, the VAE config)."""
    import torch
    from diffusers import AutoencoderKL

    vae, info = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32, output_loading_info=True)
    # Missing decoder weights would be randomly initialised and the export silently wrong.
    missing = sorted(k for k in (info.get("missing_keys") or []) if not k.startswith("encoder."))
    missing += sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        raise ExportError(f"{folder}: the VAE checkpoint does not fit AutoencoderKL: {len(missing)} missing or "
                          f"mismatched weights, e.g. {missing[:3]}")
    vae.eval()
    cfg = vae.config
    if cfg.scaling_factor is None:
        raise ExportError(f"{folder}/config.json: no scaling_factor")

    class DecodeToImage(torch.nn.Module):
        """latent -> latent / scaling + shift -> decode -> (x * 0.5 + 0.5).clamp(0, 1), as the pipeline and
        diffusers' VaeImageProcessor.postprocess (denormalize) do."""

        def __init__(self, vae, scaling: float, shift: float):
            super().__init__()
            self.vae = vae
            self.scaling = float(scaling)
            self.shift = float(shift)

        def forward(self, latent):
            image = self.vae.decode(latent / self.scaling + self.shift, return_dict=False)[0]
            return (image * 0.5 + 0.5).clamp(0, 1)

    shift = cfg.shift_factor if cfg.shift_factor is not None else 0.0  # SD-style VAEs have no shift
    return DecodeToImage(vae, cfg.scaling_factor, shift).eval(), cfg


def vae_io(cfg) -> dict:
    return {
        "inputs": [{"name": "latent", "dtype": "float32",
                    "shape": ["batch", cfg.latent_channels, "latent_height", "latent_width"]}],
        "outputs": [{"name": "image", "dtype": "float32", "shape": ["batch", cfg.out_channels, "image_height",
                                                                       "image_width"]}],
        "axes": {"batch": [1, MAX_VAE_BATCH], "latent_height": [LATENT_MIN, LATENT_MAX],
                 "latent_width": [LATENT_MIN, LATENT_MAX],
                 "image_height": [VAE_SCALE * LATENT_MIN, VAE_SCALE * LATENT_MAX],
                 "image_width": [VAE_SCALE * LATENT_MIN, VAE_SCALE * LATENT_MAX]},
    }


def export_vae_decoder(folder: str | Path, out_dir: str | Path, *, opset: int = DEFAULT_OPSET,
                       exporter: str = "auto") -> dict:
    """Export the decoder of the AutoencoderKL in `folder` into out_dir (model.onnx + model.onnx.data; a
    fresh folder, the caller makes it atomic). Returns the manifest fields except path/files/source."""
    import diffusers
    import onnx
    import torch

    t0 = time.perf_counter()
    module, cfg = load_vae_decoder(folder)
    scale = 2 ** (len(cfg.block_out_channels) - 1)
    if scale != VAE_SCALE:
        raise ExportError(f"{folder}/config.json: a {scale}x VAE; HiDream-I1 uses {VAE_SCALE}x "
                          f"({len(cfg.block_out_channels)} block_out_channels)")
    # Trace a non-square latent, batch 2: no size of 1 for dynamo to specialise, no square-only shortcut.
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, cfg.latent_channels, 2 * LATENT_MIN, 3 * LATENT_MIN, generator=g)
    axes = {0: Axis("batch", 1, MAX_VAE_BATCH), 2: Axis("latent_height", LATENT_MIN, LATENT_MAX),
            3: Axis("latent_width", LATENT_MIN, LATENT_MAX)}
    info = export_onnx(module, (latent,), Path(out_dir), input_names=["latent"], output_names=["image"],
                       dynamic=[axes], opset=opset, exporter=exporter)
    return {
        "kind": "onnx",
        "dtype": "fp32",
        **info,
        **vae_io(cfg),
        "scaling_factor": module.scaling,
        "shift_factor": module.shift,
        "vae_scale": VAE_SCALE,
        "latent_channels": cfg.latent_channels,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "diffusers": diffusers.__version__,
                     "hidream_export": own_version()},
        "export_seconds": round(time.perf_counter() - t0, 2),
    }
