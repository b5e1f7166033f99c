"""A complete random-weight HiDream-I1 model folder in the real diffusers on-disk layout.

`hidream_export.tiny.write_transformer` covers the transformer alone. End-to-end work (the torch-free
runtime, the exporters of the text encoders and the VAE, and diffusers' `HiDreamImagePipeline` as the
oracle they are compared with) needs every component, in the same files and formats as the real
HiDream-I1-{Full,Dev,Fast} repositories, so that the code paths that read a real download are the ones
the tests exercise. Nothing can be downloaded, so everything is generated here:

    OUT/
      model_index.json                  HiDreamImagePipeline and its nine shipped components
      scheduler/scheduler_config.json   UniPC (Full) or FlowMatchLCM (Dev, Fast), values from variants.py
      transformer/                      hidream_export.tiny.write_transformer
      text_encoder/, text_encoder_2/    CLIPTextModelWithProjection (CLIP-L, CLIP-G)
      tokenizer/, tokenizer_2/          CLIP BPE: vocab.json + merges.txt (+ tokenizer_config, special map)
      text_encoder_3/                   T5EncoderModel
      tokenizer_3/                      T5: SentencePiece spiece.model (+ tokenizer_config, special map)
      vae/                              AutoencoderKL shaped like the FLUX VAE (16 latent channels, 8x)
      llama/                            LlamaForCausalLM + Llama-3.1 tokenizer.json: text_encoder_4 and
                                        tokenizer_4, which the HF repos do not ship (passed separately)

Component widths are derived from the transformer config, so they always fit it: CLIP projections sum
to `text_emb_dim` (split 3:5 like the real 768 + 1280), T5 `d_model` = `caption_channels[0]`, Llama
hidden = `caption_channels[1]` with `max(llama_layers) + 1` layers. Everything a component does not need
to match (attention width, MLP width, vocabularies) is kept tiny.

Tokenizers are trained at generation time on the small built-in corpus below (byte-level BPE: the
`tokenizers` trainer for Llama, a small deterministic merge learner for CLIP; sentencepiece's unigram
trainer for T5), with the real special tokens and ids laid out as in the real vocabularies. Weights come
from the libraries' default initialisations under a seed derived per component. The result is
deterministic for a given (variant, preset, seed), byte for byte except the transformer safetensors
header, whose metadata safetensors writes in hash-map order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hidream_export.model.config import TransformerConfig, resolve_config
from hidream_export.tiny import write_transformer
from hidream_export.variants import TEXT_LENGTH, VAE_SCALE, Variant, get_variant

__all__ = ["write_model_folder", "EncoderSizes", "LLAMA_SUBDIR", "COMPONENTS"]

# Where the Llama text encoder goes inside the model folder. The HF repos do not ship it (users pass
# meta-llama/Meta-Llama-3.1-8B-Instruct); keeping it in the folder makes one path describe a whole model.
LLAMA_SUBDIR = "llama"

# model_index.json entries, exactly as the real HiDream-I1 repos list them (the scheduler is per variant).
COMPONENTS: dict[str, tuple[str, str]] = {
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
    "tokenizer_3": ("transformers", "T5Tokenizer"),
    "transformer": ("diffusers", "HiDreamImageTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}

# Text the tokenizers are trained on: prompt-like sentences with digits, punctuation and mixed case, so
# the vocabularies hold real merges and every tokenizer path (lower-casing, splitting, byte fallback) is
# exercised. Changing it changes every generated vocabulary.
CORPUS = (
    "A painting of a squirrel eating a burger.",
    "A cat holding a sign that says \"Hi-Dreams.ai\".",
    "Photo of 3 red apples on a wooden table, 35mm film, soft morning light.",
    "An astronaut riding a horse on the moon, highly detailed, 8k.",
    "A cozy cabin in the snowy mountains at night, warm light in the windows.",
    "Portrait of an old fisherman with a grey beard, dramatic lighting, oil on canvas.",
    "A bowl of ramen with a soft-boiled egg, steam rising, top-down view.",
    "Two dogs playing in the park; one is brown, the other is white with black spots.",
    "A futuristic city skyline at sunset, flying cars, neon signs in Japanese and English.",
    "Watercolor illustration of a fox sleeping under a tree in autumn.",
    "A glass of orange juice next to a stack of pancakes with maple syrup and berries.",
    "The quick brown fox jumps over the lazy dog 1234567890 times!",
    "Macro shot of a dew drop on a green leaf, shallow depth of field, f/2.8.",
    "A vintage red bicycle leaning against a blue door in a narrow street of Lisbon.",
    "Isometric pixel art of a tiny island with a lighthouse and palm trees.",
    "A robot reading a book in a library, cinematic, volumetric light, 4K.",
    "Minimalist poster: a single yellow circle on a dark teal background.",
    "A medieval castle on a cliff above the sea, storm clouds, waves crashing.",
    "Children building a sandcastle at the beach while seagulls fly overhead.",
    "A steaming cup of coffee on a rainy window sill, city lights blurred behind.",
    "Close-up of a hummingbird drinking from a purple flower, frozen wings.",
    "A hand-drawn map of a fantasy kingdom with rivers, forests and three castles.",
    "Street food market at night: lanterns, smoke, people queuing for dumplings.",
    "A white cat wearing sunglasses, lying on a pool float, summer vibes.",
    "An ancient library with spiral staircases and floating candles.",
    "Product photo of a silver wristwatch on black velvet, studio lighting.",
    "A field of sunflowers under a clear blue sky, wide angle, 24mm.",
    "Sketch of a sports car in pencil, side view, dynamic lines.",
    "A snowman with a carrot nose and a red scarf waving hello.",
    "Underwater scene with a sea turtle, coral reef and rays of sunlight.",
    "It's 5 o'clock somewhere: we'll meet at the cafe, they've said they'd come.",
    "Text that reads \"OPEN 24/7\" in glowing pink letters above a diner door.",
)


@dataclass(frozen=True)
class EncoderSizes:
    """The widths the text encoders must have to feed a given transformer."""

    clip_l_projection: int  # CLIP-L text_embeds width (768 in the real model)
    clip_g_projection: int  # CLIP-G text_embeds width (1280); the two concatenate to text_emb_dim
    t5_dim: int  # T5 d_model = caption_channels[0]
    llama_dim: int  # Llama hidden_size = caption_channels[1]
    llama_layers: int  # decoder layers whose hidden states the transformer indexes

    @classmethod
    def for_transformer(cls, config: TransformerConfig) -> "EncoderSizes":
        """Split text_emb_dim 3:5 like the real 768 + 1280 = 2048. Unequal widths on purpose: a runtime
        that concatenates the pooled embeddings in the wrong order fails on shapes, not silently."""
        if config.text_emb_dim < 2:
            raise ValueError(f"text_emb_dim={config.text_emb_dim} cannot be split between two CLIP encoders")
        clip_l = max(1, config.text_emb_dim * 3 // 8)
        return cls(clip_l, config.text_emb_dim - clip_l, config.t5_dim, config.llama_dim, config.num_llama_layers)


# ---- public entry point -----------------------------------------------------------------------------

def write_model_folder(out_dir: str | Path, variant: str = "full", preset: "str | TransformerConfig" = "tiny",
                       seed: int = 0, *, overwrite: bool = False, transformer_dtype: torch.dtype = torch.float32,
                       transformer_shards: int | None = None) -> Path:
    """Write a complete random-weight HiDream-I1-{Full,Dev,Fast} model folder at `out_dir`; return it.

    Loads with `HiDreamImagePipeline.from_pretrained(out_dir, tokenizer_4=..., text_encoder_4=...)`,
    the Llama pair coming from `out_dir/llama` (see `LLAMA_SUBDIR`). `preset` is any transformer preset
    or config; only the transformer grows with it (the encoders keep tiny attention/MLP widths and
    only take the input/output widths the transformer needs). `transformer_dtype`/`transformer_shards`
    go to `write_transformer` (the real checkpoint is bf16 in 7 shards); the other components are fp32.

    The folder is assembled in a temporary sibling and renamed into place, so readers never see half a
    model. An existing non-empty `out_dir` is an error unless `overwrite=True`, which replaces it:
    a mistyped path must not wipe a real download.
    """
    out = Path(out_dir)
    spec = get_variant(variant)
    config = resolve_config(preset)
    sizes = EncoderSizes.for_transformer(config)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with _quiet_saves():
            _write_components(tmp, spec, config, sizes, seed, transformer_dtype, transformer_shards)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a model folder is normally world-readable
        if out.exists():
            # Swap the old folder out before removing it, so `out` is always either old or new.
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_components(root: Path, spec: Variant, config: TransformerConfig, sizes: EncoderSizes, seed: int,
                      transformer_dtype: torch.dtype, transformer_shards: int | None) -> None:
    """Every component, each independent of the others but for the widths in `sizes`."""
    _write_model_index(root, spec)
    _write_scheduler(root / "scheduler", spec)
    write_transformer(root / "transformer", config, seed=seed, dtype=transformer_dtype, shards=transformer_shards)
    _write_clip_tokenizers(root)
    _write_clip_encoders(root, sizes, seed)
    _write_t5(root, sizes, seed)
    _write_vae(root / "vae", config, seed)
    _write_llama(root / LLAMA_SUBDIR, sizes, seed)


# ---- helpers shared by the components ---------------------------------------------------------------

def _component_seed(seed: int, name: str) -> int:
    """Independent, stable seeds per component: changing one component's architecture must not change
    the weights of the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % (2**63)


def _build_seeded(factory, seed: int, name: str):
    """Run `factory()` (a model constructor, which initialises from torch's global RNG) under a
    component seed, without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, name))
        return factory().eval()


@contextlib.contextmanager
def _quiet_saves():
    """transformers' save_pretrained draws a progress bar per model; generation should print nothing."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_token(content: str, normalized: bool = False) -> dict:
    """An entry of `added_tokens_decoder` / `special_tokens_map.json` as transformers writes them."""
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


def _map_token(content: str, normalized: bool = False) -> dict:
    """An entry of `special_tokens_map.json` (the same fields, without "special")."""
    entry = _added_token(content, normalized)
    del entry["special"]
    return entry


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# ---- model_index.json and scheduler -----------------------------------------------------------------

def _write_model_index(root: Path, spec: Variant) -> None:
    """The nine components the HF repos list; no text_encoder_4/tokenizer_4 (the user passes Llama)."""
    index: dict = {"_class_name": "HiDreamImagePipeline", "_diffusers_version": _diffusers_version(),
                   "scheduler": ["diffusers", spec.diffusers_scheduler]}
    index.update({name: list(lib_cls) for name, lib_cls in COMPONENTS.items()})
    # Key order as diffusers writes it: the "_" entries first, then components alphabetically.
    _write_json(root / "model_index.json", dict(sorted(index.items(), key=lambda kv: (kv[0][0] != "_", kv[0]))))


def _write_scheduler(folder: Path, spec: Variant) -> None:
    """scheduler_config.json as the real repos ship it, from the variant's recipe.

    Full: UniPCMultistepScheduler on flow sigmas (flow_shift, prediction_type "flow_prediction"; the
    default "epsilon" would be wrong). Dev/Fast: FlowMatchLCMScheduler with a static shift. Written by
    the scheduler class itself so every default the real file spells out is present."""
    from diffusers import FlowMatchLCMScheduler, UniPCMultistepScheduler

    if spec.diffusers_scheduler == "UniPCMultistepScheduler":
        scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=spec.shift,
                                            prediction_type="flow_prediction")
    elif spec.diffusers_scheduler == "FlowMatchLCMScheduler":
        scheduler = FlowMatchLCMScheduler(num_train_timesteps=1000, shift=spec.shift, use_dynamic_shifting=False)
    else:  # a new variant recipe must say how its scheduler is written
        raise ValueError(f"variant {spec.name!r}: no writer for scheduler {spec.diffusers_scheduler!r}")
    scheduler.save_pretrained(folder)


# ---- CLIP-L / CLIP-G ---------------------------------------------------------------------------------

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in its canonical order (the order of
    the first 256 entries of CLIP's vocab.json)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _learn_bpe_merges(words: dict[tuple[str, ...], int], max_merges: int, min_count: int = 2
                      ) -> list[tuple[str, str]]:
    """Classic BPE merge learning on {word as symbols: count}: repeatedly merge the most frequent
    adjacent pair, ties broken by the pair itself, so the result depends on the corpus alone.

    tokenizers' BpeTrainer is not used for CLIP because, with an end-of-word suffix, it breaks count ties
    by symbol ids assigned in hash-map order: the merges changed from one process to the next."""
    merges: list[tuple[str, str]] = []
    words = dict(words)
    while len(merges) < max_merges:
        counts: dict[tuple[str, str], int] = {}
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        if counts[best] < min_count:
            break
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


@functools.lru_cache(maxsize=None)
def _clip_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """CLIP-style BPE on the corpus (lower-cased, byte-level symbols, `</w>` on each word's last symbol),
    with the vocabulary laid out as OpenAI's is: 256 byte characters, the same with `</w>`, one token per
    merge in merge order, then <|startoftext|> and <|endoftext|> as the two highest ids.

    Words are cut by the `tokenizers` normaliser and pre-tokeniser that transformers' CLIPTokenizer uses,
    so the merges fit what the tokenizer will see. The layout matters: CLIP text models pool at the
    end-of-text token, found as argmax(input_ids) when the config carries the legacy eos_token_id=2 (as
    the real configs do), which only works because <|endoftext|> is the largest id."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                       normalizers.Lowercase()])
    splitter = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    words: dict[tuple[str, ...], int] = {}
    for text in CORPUS:
        for piece, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
            word = tuple(piece[:-1]) + (piece[-1] + "</w>",)
            words[word] = words.get(word, 0) + 1
    merges = _learn_bpe_merges(words, max_merges=300)
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab.append(a + b)
    return tuple(vocab + [CLIP_BOS, CLIP_EOS]), tuple(merges)


def _write_clip_tokenizers(root: Path) -> None:
    """tokenizer/ and tokenizer_2/ in the slow-tokenizer file format the real repos ship (no
    tokenizer.json). Same vocabulary for both, as for the real CLIP-L and OpenCLIP bigG. CLIP-G pads
    with "!" (id 0), CLIP-L with <|endoftext|>, following the SD3/SDXL CLIP-G tokenizer convention, so
    a runtime must read the pad token from the files rather than assume one."""
    vocab, merges = _clip_vocab_and_merges()
    for sub, pad in (("tokenizer", CLIP_EOS), ("tokenizer_2", "!")):
        folder = root / sub
        _write_json(folder / "vocab.json", {t: i for i, t in enumerate(vocab)})
        with open(folder / "merges.txt", "w", encoding="utf-8") as fh:
            fh.write("#version: 0.2\n")
            fh.writelines(f"{a} {b}\n" for a, b in merges)
        _write_json(folder / "tokenizer_config.json", {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(vocab.index(t)): _added_token(t, normalized=True)
                                     for t in (CLIP_BOS, CLIP_EOS)},
            "bos_token": CLIP_BOS,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": CLIP_EOS,
            "errors": "replace",
            "model_max_length": TEXT_LENGTH,
            "pad_token": pad,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": CLIP_EOS,
        })
        _write_json(folder / "special_tokens_map.json", {
            "bos_token": _map_token(CLIP_BOS, True), "eos_token": _map_token(CLIP_EOS, True),
            "pad_token": _map_token(pad, True), "unk_token": _map_token(CLIP_EOS, True)})


def _write_clip_encoders(root: Path, sizes: EncoderSizes, seed: int) -> None:
    """CLIP-L (quick_gelu, like OpenAI's) and CLIP-G (gelu, like OpenCLIP bigG) text towers with
    projection heads. 128 positions: HiDream's long CLIPs take 128 tokens, not 77. bos/eos/pad ids are
    the legacy 0/2/1 of the real configs (pooling then uses argmax(input_ids), see the vocab layout)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab_size = len(_clip_vocab_and_merges()[0])
    for sub, hidden, act, projection in (("text_encoder", 32, "quick_gelu", sizes.clip_l_projection),
                                         ("text_encoder_2", 40, "gelu", sizes.clip_g_projection)):
        config = CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, hidden_act=act,
            layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
            architectures=["CLIPTextModelWithProjection"])
        model = _build_seeded(lambda: CLIPTextModelWithProjection(config), seed, sub)
        model.save_pretrained(root / sub)


# ---- T5 ------------------------------------------------------------------------------------------

T5_EXTRA_IDS = 100  # sentinel tokens <extra_id_0..99> appended after the sentencepiece vocabulary


@functools.lru_cache(maxsize=None)
def _t5_spiece_model() -> bytes:
    """A unigram sentencepiece model with T5's special ids (<pad>=0, </s>=1, <unk>=2, no BOS) and its
    nmt_nfkc normalisation; the proto is what `spiece.model` holds in the real repos. One thread, so
    training is reproducible."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, model_type="unigram", vocab_size=256,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", character_coverage=1.0, normalization_rule_name="nmt_nfkc", num_threads=1,
        minloglevel=2)
    return buf.getvalue()


def _write_t5(root: Path, sizes: EncoderSizes, seed: int) -> None:
    """tokenizer_3/ (spiece.model + configs, like google/t5-v1_1-xxl) and text_encoder_3/ (a T5 v1.1
    encoder: gated-gelu, untied, relative position buckets), d_model = the transformer's T5 width."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    proto = _t5_spiece_model()
    n_pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    folder = root / "tokenizer_3"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(proto)
    # Sentinels: <extra_id_0> is the LAST id, counting down (T5's convention).
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    decoder = {"0": _added_token("<pad>"), "1": _added_token("</s>"), "2": _added_token("<unk>")}
    decoder.update({str(n_pieces + T5_EXTRA_IDS - 1 - i): _added_token(t) for i, t in enumerate(extra)})
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": True,
        "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })
    _write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": [_map_token(t) for t in extra],
        "eos_token": _map_token("</s>"), "pad_token": _map_token("<pad>"), "unk_token": _map_token("<unk>"),
    })

    # Like the real 32128 (= 32000 pieces + 100 sentinels, padded to a multiple of 128), rounded up to 8.
    vocab_size = -(-(n_pieces + T5_EXTRA_IDS) // 8) * 8
    config = T5Config(
        vocab_size=vocab_size, d_model=sizes.t5_dim, d_kv=8, d_ff=64, num_layers=2,
        num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=True, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, architectures=["T5EncoderModel"])
    model = _build_seeded(lambda: T5EncoderModel(config), seed, "text_encoder_3")
    model.save_pretrained(root / "text_encoder_3")


# ---- VAE -----------------------------------------------------------------------------------------

def _write_vae(folder: Path, config: TransformerConfig, seed: int) -> None:
    """The FLUX VAE's structure with narrow channels: four down/up levels (so the pipeline's
    vae_scale_factor = 2**(4-1) = 8, as in the real model), 16 latent channels = transformer input,
    no quant convs, FLUX's scaling/shift factors."""
    from diffusers import AutoencoderKL

    levels = 4
    assert 2 ** (levels - 1) == VAE_SCALE
    vae_kwargs = dict(
        in_channels=3, out_channels=3, latent_channels=config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4, act_fn="silu",
        sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    model = _build_seeded(lambda: AutoencoderKL(**vae_kwargs), seed, "vae")
    model.save_pretrained(folder)


# ---- Llama 3.1 -----------------------------------------------------------------------------------

# Meta-Llama-3.1's 256 special tokens, in id order after the BPE vocabulary (128000..128255 there).
LLAMA_SPECIALS = (
    ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
     "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
     "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
)
# Llama 3's pre-tokenisation regex (tiktoken's cl100k pattern), as in its tokenizer.json.
LLAMA_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# A compact version of the Llama 3.1 chat format (headers + <|eot_id|>), enough for apply_chat_template.
LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


@functools.lru_cache(maxsize=None)
def _llama_tokenizer_json() -> str:
    """A Llama-3-style tokenizer.json: byte-level BPE (no unk, ignore_merges) trained on the corpus,
    the 256 special tokens right after it, and a post-processor that prepends <|begin_of_text|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(LLAMA_SPECIALS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    return tok.to_str(pretty=True)


def _write_llama(folder: Path, sizes: EncoderSizes, seed: int) -> None:
    """llama/: LlamaForCausalLM + tokenizer files as in meta-llama/Meta-Llama-3.1-8B-Instruct
    (tokenizer.json, tokenizer_config.json with PreTrainedTokenizerFast, special_tokens_map.json,
    generation_config.json). Llama-3.1 structure: GQA (4 query / 2 key-value heads), llama3 RoPE
    scaling, untied head; hidden = the transformer's Llama width, layers = what llama_layers index."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _llama_tokenizer_json()
    (folder / "tokenizer.json").write_text(tokenizer_json + "\n", encoding="utf-8")
    n_base = len(json.loads(tokenizer_json)["model"]["vocab"])
    ids = {t: n_base + i for i, t in enumerate(LLAMA_SPECIALS)}
    bos = ids["<|begin_of_text|>"]
    eos_ids = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]  # as the real config lists them
    _write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": {str(i): _added_token(t) for t, i in ids.items()},
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": _map_token("<|begin_of_text|>"), "eos_token": _map_token("<|eot_id|>"),
    })

    config = LlamaConfig(
        vocab_size=n_base + len(LLAMA_SPECIALS), hidden_size=sizes.llama_dim, intermediate_size=64,
        num_hidden_layers=sizes.llama_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos_ids, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        architectures=["LlamaForCausalLM"])
    model = _build_seeded(lambda: LlamaForCausalLM(config), seed, "llama")
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos_ids, do_sample=True,
                                               temperature=0.6, top_p=0.9)
    model.save_pretrained(folder)
    _legacy_rope_keys(folder / "config.json")


def _legacy_rope_keys(path: Path) -> None:
    """Rewrite a transformers-5 Llama config.json with the keys the real Meta-Llama-3.1 file has
    (`rope_theta` + `rope_scaling`, `torch_dtype`; v5 writes one `rope_parameters` dict and `dtype`).
    Code that reads the real config.json without transformers sees the same keys here; transformers 5
    still reads this layout."""
    data = json.loads(path.read_text())
    rope = dict(data.pop("rope_parameters"))
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = rope
    if "dtype" in data:
        data["torch_dtype"] = data.pop("dtype")
    _write_json(path, dict(sorted(data.items())))
