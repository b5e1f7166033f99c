"""The complete tiny model folder: real layout and formats, and diffusers' own pipeline as the oracle.

If `HiDreamImagePipeline.from_pretrained` loads the folder and produces an image, every component is
in the form a real HiDream-I1 download has; the runtime and the exporters are tested on these folders.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hidream_export.model.config import TransformerConfig, get_preset
from hidream_export.testing.model_folder import LLAMA_SUBDIR, write_model_folder
from hidream_export.variants import TEXT_LENGTH, VARIANTS

PROMPT = "A painting of a squirrel eating a burger, 42 times!"

WEIGHTS = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
    "text_encoder_3": "model.safetensors",
    LLAMA_SUBDIR: "model.safetensors",
}
# Tokenizer files as the real repos ship them (CLIP and T5 without tokenizer.json).
TOKENIZER_FILES = {
    "tokenizer": {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"},
    "tokenizer_2": {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"},
    "tokenizer_3": {"spiece.model", "tokenizer_config.json", "special_tokens_map.json"},
}
LLAMA_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def folders(tiny_models):
    return {name: tiny_models(name) for name in VARIANTS}


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _load_pipeline(folder: Path):
    """The documented way: Llama passed explicitly, with hidden states on (the pipeline stacks them)."""
    from diffusers import HiDreamImagePipeline
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer_4 = AutoTokenizer.from_pretrained(folder / LLAMA_SUBDIR)
    text_encoder_4 = LlamaForCausalLM.from_pretrained(folder / LLAMA_SUBDIR, output_hidden_states=True,
                                                      output_attentions=True)
    return HiDreamImagePipeline.from_pretrained(folder, tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4)


# ---- (a) layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_folder_has_the_real_layout(folders, variant):
    folder, spec = folders[variant], VARIANTS[variant]
    index = _read(folder / "model_index.json")
    assert index["_class_name"] == "HiDreamImagePipeline"
    assert index["scheduler"] == ["diffusers", spec.diffusers_scheduler]
    assert {k for k in index if not k.startswith("_")} == {
        "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
        "tokenizer_3", "transformer", "vae"}  # no text_encoder_4/tokenizer_4, like the HF repos
    assert index["tokenizer_3"] == ["transformers", "T5Tokenizer"]

    sched = _read(folder / "scheduler" / "scheduler_config.json")
    assert sched["_class_name"] == spec.diffusers_scheduler
    if variant == "full":
        assert sched["use_flow_sigmas"] is True and sched["prediction_type"] == "flow_prediction"
        assert sched["flow_shift"] == spec.shift
    else:
        assert sched["shift"] == spec.shift and sched["use_dynamic_shifting"] is False

    for sub, weights in WEIGHTS.items():
        assert (folder / sub / "config.json").is_file(), sub
        assert (folder / sub / weights).is_file(), sub
    for sub, names in TOKENIZER_FILES.items():
        assert {p.name for p in (folder / sub).iterdir()} == names, sub
    assert {p.name for p in (folder / LLAMA_SUBDIR).iterdir()} == LLAMA_FILES
    assert (folder / "tokenizer" / "merges.txt").read_text().startswith("#version: 0.2\n")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"{total / 2**20:.1f} MiB"


def test_component_widths_fit_the_transformer(folders):
    folder = folders["full"]
    cfg = TransformerConfig.from_file(folder / "transformer" / "config.json")
    assert cfg == get_preset("tiny")
    clip_l, clip_g = (_read(folder / s / "config.json") for s in ("text_encoder", "text_encoder_2"))
    assert clip_l["projection_dim"] + clip_g["projection_dim"] == cfg.text_emb_dim
    assert clip_l["projection_dim"] != clip_g["projection_dim"]  # a swapped concat fails on shapes
    assert clip_l["max_position_embeddings"] == clip_g["max_position_embeddings"] == TEXT_LENGTH
    assert _read(folder / "text_encoder_3" / "config.json")["d_model"] == cfg.t5_dim
    llama = _read(folder / LLAMA_SUBDIR / "config.json")
    assert (llama["hidden_size"], llama["num_hidden_layers"]) == (cfg.llama_dim, cfg.num_llama_layers)
    assert llama["rope_scaling"]["rope_type"] == "llama3"  # the real file's keys, not v5's rope_parameters
    vae = _read(folder / "vae" / "config.json")
    assert vae["latent_channels"] == cfg.in_channels and len(vae["block_out_channels"]) == 4
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)


# ---- (c) tokenizers ------------------------------------------------------------------------------

def test_tokenizers_load_and_pad_to_128(folders):
    import sentencepiece as spm
    import tokenizers
    from transformers import AutoTokenizer, CLIPTokenizer, T5Tokenizer

    folder = folders["full"]

    def padded(tok):
        ids = tok(PROMPT, padding="max_length", max_length=TEXT_LENGTH, truncation=True).input_ids
        assert len(ids) == TEXT_LENGTH
        return ids

    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tok = CLIPTokenizer.from_pretrained(folder / sub)
        assert type(AutoTokenizer.from_pretrained(folder / sub)) is CLIPTokenizer
        ids = padded(tok)
        n = len(tok(PROMPT).input_ids)
        assert ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id and tok.pad_token == pad
        assert ids[n:] == [tok.pad_token_id] * (TEXT_LENGTH - n)
        assert tok.eos_token_id == len(tok) - 1 == max(ids)  # pooling at argmax(ids) finds the EOS
        assert tok.decode(ids, skip_special_tokens=True).startswith("a painting of a squirrel")

    tok = T5Tokenizer.from_pretrained(folder / "tokenizer_3")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer_3" / "spiece.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    ids = padded(tok)
    expected = sp.encode(PROMPT) + [1]  # the converted tokenizer agrees with sentencepiece itself
    assert ids == expected + [0] * (TEXT_LENGTH - len(expected))
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1 == sp.get_piece_size() + 99

    tok = AutoTokenizer.from_pretrained(folder / LLAMA_SUBDIR)
    tok.pad_token = tok.eos_token  # what HiDreamImagePipeline does
    ids = padded(tok)
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>") == tok.bos_token_id
    assert tok.pad_token == "<|eot_id|>" and ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
    raw = tokenizers.Tokenizer.from_file(str(folder / LLAMA_SUBDIR / "tokenizer.json"))
    assert raw.encode(PROMPT).ids == tok(PROMPT).input_ids


# ---- (b) the oracle: diffusers' pipeline runs on the folders --------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_diffusers_pipeline_runs_on_the_folder(folders, variant):
    from diffusers import FlowMatchLCMScheduler, UniPCMultistepScheduler

    spec = VARIANTS[variant]
    pipe = _load_pipeline(folders[variant])
    assert type(pipe.scheduler) is {"UniPCMultistepScheduler": UniPCMultistepScheduler,
                                    "FlowMatchLCMScheduler": FlowMatchLCMScheduler}[spec.diffusers_scheduler]
    assert pipe.vae_scale_factor == 8
    # Every request is rescaled to (default_sample_size * vae_scale_factor)^2 pixels: 16 -> 128x128.
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)

    def run():
        torch.manual_seed(0)  # FlowMatchLCM draws its re-noise from the global RNG
        return pipe(PROMPT, num_inference_steps=2, guidance_scale=spec.guidance_scale, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    image = run()
    assert image.shape == (1, 128, 128, 3)
    assert np.isfinite(image).all() and image.std() > 0.01
    np.testing.assert_array_equal(run(), image)


def test_encoders_follow_a_custom_transformer_config(tmp_path):
    """Widths are derived, not hard-coded: another config still gives a folder the pipeline runs."""
    cfg = TransformerConfig(
        in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        caption_channels=(40, 16), text_emb_dim=24, num_routed_experts=2, num_activated_experts=1,
        axes_dims_rope=(8, 4, 4), max_resolution=(32, 32), llama_layers=(3, 0, 1))
    pipe = _load_pipeline(write_model_folder(tmp_path / "m", "fast", cfg, seed=3))
    assert pipe.text_encoder_4.config.num_hidden_layers == 4
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=2, guidance_scale=0.0, output_type="np").images
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()


# ---- generation: deterministic, atomic, CLI -------------------------------------------------------

def test_generation_is_deterministic(folders, tmp_path):
    import hidream_export.testing.tokenizers as tp

    # Drop the in-process tokenizer caches so the tokenizers are trained again (hash-map order in the
    # Rust trainers changes between map instances, as it does between processes).
    for fn in (tp.clip_vocab_and_merges, tp.t5_spiece_model, tp.llama_tokenizer_json):
        fn.cache_clear()
    again = _digests(write_model_folder(tmp_path / "again", "full"))
    reference = _digests(folders["full"])
    # The transformer's safetensors header stores its metadata in hash-map order (safetensors writes it
    # from a Rust HashMap), so compare that file's tensors rather than its bytes.
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert {k: v for k, v in again.items() if k != weights} == {k: v for k, v in reference.items() if k != weights}
    new, ref = load_file(tmp_path / "again" / weights), load_file(folders["full"] / weights)
    assert new.keys() == ref.keys() and all(torch.equal(new[k], ref[k]) for k in ref)
    other = _digests(write_model_folder(tmp_path / "seed1", "full", seed=1))
    assert other["tokenizer/vocab.json"] == again["tokenizer/vocab.json"]
    assert other["text_encoder/model.safetensors"] != again["text_encoder/model.safetensors"]


def test_refuses_to_clobber_and_overwrites_atomically(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "precious.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_model_folder(out, "dev")
    assert (out / "precious.bin").exists()
    write_model_folder(out, "dev", overwrite=True)
    assert not (out / "precious.bin").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or old folders left behind


def test_cli(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint",
                                                  Path(__file__).parents[1] / "tools" / "make_tiny_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    main = cli.main

    assert main([str(tmp_path / "dev"), "--full", "--variant", "dev"]) == 0
    sched = _read(tmp_path / "dev" / "scheduler" / "scheduler_config.json")
    assert (sched["_class_name"], sched["shift"]) == ("FlowMatchLCMScheduler", VARIANTS["dev"].shift)
    assert main([str(tmp_path / "dev"), "--full", "--variant", "dev"]) == 2  # not empty, no --overwrite
    assert main([str(tmp_path / "dev"), "--full", "--variant", "fast", "--overwrite", "--shards", "2"]) == 0
    assert len(list((tmp_path / "dev" / "transformer").glob("*.safetensors"))) == 2
    assert main([str(tmp_path / "t")]) == 0  # the transformer-only mode is unchanged
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["transformer"]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "t"), "--variant", "dev"])
