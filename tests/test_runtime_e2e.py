"""End-to-end oracle: the torch-free runtime on a built engine folder == diffusers' HiDreamImagePipeline.

For each variant: write a tiny random model folder (real diffusers layout), build it with
`hidream_export.build.pipeline.build_pipeline`, then generate the same image twice, with diffusers
(torch, from the model folder) and with `hidream_export.runtime.Pipeline` (onnxruntime, from the engine
folder), feeding both the same initial latents and, for the stochastic Dev/Fast scheduler, the same
per-step noise (diffusers' FlowMatchLCMScheduler draws it with `randn_tensor` from torch's global RNG;
it is swapped for our arrays). Everything is fp32.

Tolerance: max |diffusers - runtime| <= 1e-3 on the [0, 1] float images (and uint8 pixels within one
level). The measured values are printed (run with -s) and attached to the test report as properties.
"""

from __future__ import annotations

import diffusers.schedulers.scheduling_flow_match_lcm as lcm_module
import numpy as np
import pytest
import torch

from hidream_export.runtime import Pipeline
from hidream_export.testing.model_folder import LLAMA_SUBDIR
from hidream_export.variants import VAE_SCALE, get_variant

pytestmark = pytest.mark.slow

PROMPT = "A painting of a squirrel eating a burger"
IMAGE_ATOL = 1e-3
# Per variant: a few steps and a size inside the tiny transformer's exported range (128..336 px,
# max_seq 256 tokens). Dev runs non-square, so the transformer's padding path is compared.
CASES = {
    "full": dict(steps=3, guidance=5.0, width=256, height=256),  # CFG with negative prompt ""
    "dev": dict(steps=3, guidance=0.0, width=320, height=192),  # 20 x 12 = 240 tokens, padded to 256
    "fast": dict(steps=4, guidance=0.0, width=256, height=256),
}
# diffusers rescales every request to (default_sample_size * 8)^2 px; 32 -> 256^2, which keeps the sizes
# above as they are (320x192 is within 16 px of that area), so both sides run the same size.
DEFAULT_SAMPLE_SIZE = 32
MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def variant_folders(tiny_models, built):
    """variant -> (model folder, engine folder), from the session's shared builds (tests/conftest.py)."""
    return lambda variant: (tiny_models(variant), built.folder(variant))


def _diffusers_pipeline(model):
    from diffusers import HiDreamImagePipeline
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer_4 = AutoTokenizer.from_pretrained(model / LLAMA_SUBDIR)
    text_encoder_4 = LlamaForCausalLM.from_pretrained(model / LLAMA_SUBDIR, output_hidden_states=True,
                                                      output_attentions=True)
    pipe = HiDreamImagePipeline.from_pretrained(model, tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4,
                                                torch_dtype=torch.float32)
    pipe.default_sample_size = DEFAULT_SAMPLE_SIZE
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("variant", sorted(CASES))
def test_runtime_matches_diffusers(variant_folders, variant, monkeypatch, record_property):
    case, spec = CASES[variant], get_variant(variant)
    model, engines = variant_folders(variant)
    w, h, steps = case["width"], case["height"], case["steps"]

    runtime = Pipeline.from_dir(engines, threads=2, progress=False)
    channels = runtime.transformer_info.in_channels
    rng = np.random.default_rng(1234)
    latents = rng.standard_normal((1, channels, h // VAE_SCALE, w // VAE_SCALE), dtype=np.float32)
    noise = None
    if spec.scheduler == "flash_flow_euler":  # FlowMatchLCM draws noise at every step (the last unused)
        noise = [rng.standard_normal(latents.shape, dtype=np.float32) for _ in range(steps)]

    # --- diffusers -------------------------------------------------------------------------------------
    pipe = _diffusers_pipeline(model)
    if noise is not None:
        draws = iter(noise)

        def injected_randn(shape, generator=None, device=None, dtype=None, **_):
            n = next(draws)
            assert tuple(shape) == n.shape
            return torch.from_numpy(n.copy()).to(dtype or torch.float32)

        monkeypatch.setattr(lcm_module, "randn_tensor", injected_randn)
    ref_steps = []

    def keep_latents(_pipe, i, t, kwargs):
        ref_steps.append(kwargs["latents"].detach().numpy().copy())
        return kwargs

    with torch.no_grad():
        ref = pipe(PROMPT, negative_prompt="" if case["guidance"] > 1 else None, width=w, height=h,
                   num_inference_steps=steps, guidance_scale=case["guidance"], output_type="np",
                   latents=torch.from_numpy(latents.copy()), callback_on_step_end=keep_latents).images[0]
    assert ref.shape == (h, w, 3), "diffusers rescaled the size; adjust DEFAULT_SAMPLE_SIZE"
    if noise is not None:
        assert next(draws, None) is None, "diffusers drew a different number of noise tensors"

    # --- runtime ---------------------------------------------------------------------------------------
    ours_steps = []
    result = runtime(PROMPT, negative_prompt="", width=w, height=h, steps=steps, guidance_scale=case["guidance"],
                     any_size=True, latents=latents, noise=noise, return_latents=True,
                     callback=lambda i, t, x: ours_steps.append(x.copy()))
    assert result.info["cfg"] == (case["guidance"] > 1)

    step_diffs = [float(np.abs(a - b).max()) for a, b in zip(ours_steps, ref_steps)]
    image_diff = float(np.abs(result.array - ref).max())
    ref_u8 = (ref * 255).round().astype(np.int16)  # diffusers' numpy_to_pil rounding
    pixel_diff = int(np.abs(np.asarray(result.image).astype(np.int16) - ref_u8).max())
    MEASURED[variant] = {"image_max_abs": image_diff, "latent_max_abs_per_step": step_diffs,
                         "uint8_max": pixel_diff}
    record_property("image_max_abs_diff", image_diff)
    record_property("latent_max_abs_diff_per_step", step_diffs)
    print(f"\n{variant}: {w}x{h}, {steps} steps, guidance {case['guidance']}: image max|diff| {image_diff:.3g}, "
          f"uint8 max {pixel_diff}, latents per step {['%.3g' % d for d in step_diffs]}")

    assert len(ours_steps) == len(ref_steps) == steps
    assert ref.std() > 0.01  # a real image, not a constant that would match anything
    assert image_diff <= IMAGE_ATOL, f"{variant}: image max abs diff {image_diff}"
    assert pixel_diff <= 1


def test_full_build_reproduces_with_one_seed(variant_folders):
    """On a real build, a seed gives one image bit for bit; another seed another image."""
    _, engines = variant_folders("full")
    runtime = Pipeline.from_dir(engines, threads=2, progress=False)
    a = runtime(PROMPT, width=128, height=128, any_size=True, steps=2, seed=5)
    b = runtime(PROMPT, width=128, height=128, any_size=True, steps=2, seed=5)
    c = runtime(PROMPT, width=128, height=128, any_size=True, steps=2, seed=6)
    assert a.image.tobytes() == b.image.tobytes() != c.image.tobytes()
