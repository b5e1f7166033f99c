"""End-to-end LoRA oracle: engine folders with a LoRA == diffusers' HiDreamImagePipeline after
`load_lora_weights` + `set_adapters`, same latents and noise (as tests/test_runtime_e2e.py feeds them).

For the tiny Full and Dev folders, the LoRA is fused at build time (a folder of its own, built next to the
session's `built` folders so the shared encoders are reused) and applied at load time to the plain folder;
both must give diffusers' image within 1e-3 on [0, 1] (fp32), and differ from the image without LoRA.
Two stacked LoRAs must match diffusers' multi-adapter result, and switching LoRAs on a loaded Pipeline
and back must give the same bytes as fresh loads.
"""

from __future__ import annotations

import json

import diffusers.schedulers.scheduling_flow_match_lcm as lcm_module
import numpy as np
import pytest
import torch
from diffusers import HiDreamImagePipeline
from transformers import AutoTokenizer, LlamaForCausalLM

from hidream_export.build.pipeline import build_pipeline
from hidream_export.cli import main as cli_main
from hidream_export.errors import CheckpointInputError
from hidream_export.files import sha256_file
from hidream_export.runtime import Pipeline
from hidream_export.testing.loras import DETAIL_MODULES, STYLE_MODULES, random_factors, write_lora
from hidream_export.testing.model_folder import LLAMA_SUBDIR
from hidream_export.variants import VAE_SCALE, get_variant

pytestmark = pytest.mark.slow

PROMPT = "A painting of a squirrel eating a burger"
IMAGE_ATOL = 1e-3  # as tests/test_runtime_e2e.py: fp32 on both sides, summation order only
GUARD = 2e-2  # the LoRA must change the image by far more than the tolerance
# Full: the diffusers layout with alphas in its metadata; Dev: the diffusion_model.* layout diffusers
# converts (ai-toolkit: lora_A/lora_B, alpha = rank).
CASES = {
    "full": dict(steps=3, guidance=5.0, width=256, height=256, lora="style", scale=0.8),
    "dev": dict(steps=3, guidance=0.0, width=320, height=192, lora="detail", scale=0.7),
}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_loras")
    style = random_factors("tiny", STYLE_MODULES, rank=4, seed=11)
    detail = random_factors("tiny", DETAIL_MODULES, rank=8, seed=12)
    alphas = {m: (8.0 if i % 2 else 2.0) for i, m in enumerate(STYLE_MODULES)}
    return {"style": write_lora(root / "style.safetensors", style, "diffusers", alphas),
            "detail": write_lora(root / "detail.safetensors", detail, "ai-toolkit"),
            "detail-diffusers": write_lora(root / "detail-diffusers.safetensors", detail, "diffusers")}


@pytest.fixture(scope="module")
def fused_folder(built, tiny_models, loras):
    """variant -> an engine folder built with that variant's case LoRA fused (one per variant)."""
    made = {}

    def get(variant: str):
        if variant not in made:
            case = CASES[variant]
            made[variant] = built.root / f"{variant}_lora"
            build_pipeline(tiny_models(variant), variant, made[variant], loras=[(loras[case["lora"]], case["scale"])])
        return made[variant]

    return get


def draws(variant: str, steps: int, width: int, height: int, channels: int = 16):
    """The initial latents and, for the stochastic Dev/Fast scheduler, one noise array per step."""
    rng = np.random.default_rng(1234)
    latents = rng.standard_normal((1, channels, height // VAE_SCALE, width // VAE_SCALE), dtype=np.float32)
    noise = None
    if get_variant(variant).scheduler == "flash_flow_euler":
        noise = [rng.standard_normal(latents.shape, dtype=np.float32) for _ in range(steps)]
    return latents, noise


def diffusers_image(model, case: dict, latents, noise, adapters: list[tuple], monkeypatch) -> np.ndarray:
    """diffusers' image with `adapters` ((file, scale) pairs) loaded by load_lora_weights + set_adapters."""
    tokenizer_4 = AutoTokenizer.from_pretrained(model / LLAMA_SUBDIR)
    text_encoder_4 = LlamaForCausalLM.from_pretrained(model / LLAMA_SUBDIR, output_hidden_states=True,
                                                      output_attentions=True)
    pipe = HiDreamImagePipeline.from_pretrained(model, tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4,
                                                torch_dtype=torch.float32)
    pipe.default_sample_size = 32  # keeps the tests' sizes as they are (see tests/test_runtime_e2e.py)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, _) in enumerate(adapters):
        pipe.load_lora_weights(str(path), adapter_name=f"adapter{i}")
    if adapters:
        pipe.set_adapters([f"adapter{i}" for i in range(len(adapters))], adapter_weights=[s for _, s in adapters])
    if noise is not None:
        it = iter(noise)
        monkeypatch.setattr(lcm_module, "randn_tensor",
                            lambda shape, generator=None, device=None, dtype=None, **_: torch.from_numpy(next(it).copy()))
    with torch.no_grad():
        image = pipe(PROMPT, negative_prompt="" if case["guidance"] > 1 else None, width=case["width"],
                     height=case["height"], num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                     output_type="np", latents=torch.from_numpy(latents.copy())).images[0]
    assert image.shape == (case["height"], case["width"], 3)
    return image


def ours(pipe: Pipeline, case: dict, latents, noise) -> np.ndarray:
    return pipe(PROMPT, negative_prompt="", width=case["width"], height=case["height"], steps=case["steps"],
                guidance_scale=case["guidance"], any_size=True, latents=latents, noise=noise).array


@pytest.mark.parametrize("variant", sorted(CASES))
def test_lora_fused_at_build_and_applied_at_load_match_diffusers(variant, tiny_models, built, fused_folder, loras,
                                                                 monkeypatch, record_property):
    case = CASES[variant]
    lora = (loras[case["lora"]], case["scale"])
    latents, noise = draws(variant, case["steps"], case["width"], case["height"])
    ref = diffusers_image(tiny_models(variant), case, latents, noise, [lora], monkeypatch)
    fused = ours(Pipeline.from_dir(fused_folder(variant), threads=2, progress=False), case, latents, noise)
    loaded = ours(Pipeline.from_dir(built.folder(variant), threads=2, progress=False, loras=[lora]), case, latents,
                  noise)
    plain = ours(Pipeline.from_dir(built.folder(variant), threads=2, progress=False), case, latents, noise)
    errors = {"fused": float(np.abs(fused - ref).max()), "loaded": float(np.abs(loaded - ref).max()),
              "no_lora": float(np.abs(plain - ref).max())}
    record_property("image_max_abs_diff", errors)
    print(f"\n{variant}: {errors}")
    assert errors["fused"] <= IMAGE_ATOL and errors["loaded"] <= IMAGE_ATOL, errors
    assert errors["no_lora"] > GUARD, errors


def test_stacked_loras_match_diffusers_multi_adapter(tiny_models, built, loras, monkeypatch):
    case = CASES["full"]
    adapters = [(loras["style"], 0.8), (loras["detail-diffusers"], -0.5)]
    latents, noise = draws("full", case["steps"], case["width"], case["height"])
    ref = diffusers_image(tiny_models("full"), case, latents, noise, adapters, monkeypatch)
    got = ours(Pipeline.from_dir(built.folder("full"), threads=2, progress=False, loras=adapters), case, latents, noise)
    only_style = ours(Pipeline.from_dir(built.folder("full"), threads=2, progress=False, loras=adapters[:1]), case,
                      latents, noise)
    assert float(np.abs(got - ref).max()) <= IMAGE_ATOL
    assert float(np.abs(only_style - ref).max()) > GUARD  # the second LoRA counts


def test_switching_loras_and_back_is_bit_identical_to_fresh_loads(built, loras, tmp_path):
    folder = built.folder("full")
    data = folder / "transformer" / "model.onnx.data"
    before = sha256_file(data)
    style, detail = (loras["style"], 0.8), (loras["detail"], 1.2)
    kwargs = dict(width=128, height=128, any_size=True, steps=2, seed=7)

    def fresh(*sets):
        return Pipeline.from_dir(folder, threads=2, progress=False, loras=list(sets))(PROMPT, **kwargs)

    pipe = Pipeline.from_dir(folder, threads=2, progress=False, loras=[style])
    first = pipe(PROMPT, **kwargs)
    session = pipe.sessions["transformer"]
    pipe.set_loras([style])  # the set it runs: nothing to do
    assert pipe.sessions["transformer"] is session
    encoders = {n: s for n, s in pipe.sessions.items() if n != "transformer"}
    pipe.set_loras([detail])
    assert pipe.sessions["transformer"] is not session
    assert all(pipe.sessions[n] is s for n, s in encoders.items())  # only the transformer reloads
    switched = pipe(PROMPT, **kwargs)
    with pytest.raises(CheckpointInputError, match="no such LoRA file"):
        pipe.set_loras([detail, (tmp_path / "missing.safetensors", 1.0)])
    assert pipe(PROMPT, **kwargs).image.tobytes() == switched.image.tobytes()  # a refused set changes nothing
    pipe.set_loras([style])
    back = pipe(PROMPT, **kwargs)
    pipe.set_loras([])
    none = pipe(PROMPT, **kwargs)
    assert back.image.tobytes() == first.image.tobytes() == fresh(style).image.tobytes()
    assert switched.image.tobytes() == fresh(detail).image.tobytes() != first.image.tobytes()
    assert none.image.tobytes() == fresh().image.tobytes() != first.image.tobytes()
    assert first.info["loras"][0]["scale"] == 0.8 and none.info["loras"] == []
    assert sha256_file(data) == before  # the folder's weights are never written


def test_generate_cli_applies_loras(built, loras, tmp_path):
    folder = built.folder("full")
    report, image = tmp_path / "r.json", tmp_path / "x.png"
    assert cli_main(["generate", str(folder), "--prompt", PROMPT, "--seed", "3", "--steps", "1", "--width", "128",
                     "--height", "128", "--any-size", "--quiet", "--lora", f"{loras['style']}:0.8", "--json",
                     str(report), "-o", str(image)]) == 0
    loras_used = json.loads(report.read_text())["loras"]
    assert [(r["file"], r["scale"]) for r in loras_used] == [("style.safetensors", 0.8)]
    expected = Pipeline.from_dir(folder, threads=2, progress=False, loras=[(loras["style"], 0.8)])(
        PROMPT, seed=3, steps=1, width=128, height=128, any_size=True)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(expected.image))
