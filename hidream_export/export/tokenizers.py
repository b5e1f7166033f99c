"""Turn HiDream-I1's four tokenizers into `tokenizer.json` files the torch-free runtime loads with the
`tokenizers` library alone (`tokenizers.Tokenizer.from_file`), giving the ids the pipeline gives.

The HF model folders ship CLIP as vocab.json + merges.txt and T5 as a SentencePiece spiece.model; only
Llama has a tokenizer.json. transformers 5 builds a Rust `tokenizers.Tokenizer` from any of them when it
loads the tokenizer, so the conversion is: load the tokenizer exactly as `HiDreamImagePipeline` does
(same class; Llama's pad token set to its EOS), take its backend tokenizer, bake in HiDream's call
settings, which the pipeline passes per call and the runtime should not have to know:

    padding="max_length", max_length=128, truncation=True, add_special_tokens=True

and save it. `encode_batch(prompts)` on the saved file then returns 128 ids per prompt and the attention
mask (T5 and Llama pass it to their encoders, CLIP does not). Because a converted tokenizer that disagrees
with the reference would silently change every image, each conversion is checked against the
transformers tokenizer on probe prompts (empty, ordinary, over-long, odd whitespace and special-token text)
before it is accepted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hidream_export.errors import ExportError
from hidream_export.export.common import own_version
from hidream_export.export.encoders import ENCODERS
from hidream_export.variants import TEXT_LENGTH

TOKENIZER_FILE = "tokenizer.json"
RECIPE_VERSION = 1  # bumped whenever the baked-in settings below change
# Files a tokenizer folder may load from (they key the shared store; weights etc. are not tokenizer input).
SOURCE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "spiece.model", "tokenizer.model")
# The pipeline's CLIP length is min(max_sequence_length, 218), independent of the tokenizer's
# model_max_length (HiDream's CLIPs were retrained for long prompts); T5 and Llama use
# min(max_sequence_length, tokenizer.model_max_length).
CLIP_PIPELINE_CAP = 218

PROBE_PROMPTS = (
    "",
    "A painting of a squirrel eating a burger, 42 times!",
    "  Leading and trailing   spaces, tabs\tand\nnew lines  ",
    "Ünïcödé, 日本語のテキスト and an emoji 😀 -- plus <|endoftext|> </s> <pad> <|eot_id|> look-alikes",
    " ".join(f"word{i}" for i in range(300)),  # far over 128 tokens: truncated
)


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    name: str  # clip_l, clip_g, t5, llama (the encoder it feeds)
    subfolder: str | None  # in the checkpoint; None = the separately passed Llama folder (--llama)
    loader: str  # transformers class the pipeline loads it with
    pad_with_eos: bool  # HiDreamImagePipeline sets tokenizer_4.pad_token = eos_token

    @property
    def component(self) -> str:
        return f"tokenizer_{self.name}"

    @property
    def uses_attention_mask(self) -> bool:
        return ENCODERS[self.name].uses_attention_mask


TOKENIZERS: dict[str, TokenizerSpec] = {
    "clip_l": TokenizerSpec("clip_l", "tokenizer", "CLIPTokenizer", False),
    "clip_g": TokenizerSpec("clip_g", "tokenizer_2", "CLIPTokenizer", False),
    "t5": TokenizerSpec("t5", "tokenizer_3", "T5Tokenizer", False),
    "llama": TokenizerSpec("llama", None, "AutoTokenizer", True),
}


def tokenizer_source_files(folder: str | Path, what: str = "tokenizer") -> list[Path]:
    """The tokenizer files present in `folder`; ExportError if there is none."""
    folder = Path(folder)
    files = [folder / n for n in SOURCE_NAMES if (folder / n).is_file()]
    if not any(f.name in ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model") for f in files):
        raise ExportError(f"{folder}: no {what} files (expected tokenizer.json, vocab.json + merges.txt, "
                          f"spiece.model or tokenizer.model)")
    return files


def load_reference_tokenizer(name: str, folder: str | Path):
    """The transformers tokenizer as HiDreamImagePipeline uses it (the oracle for the converted file)."""
    import transformers

    spec = _spec(name)
    tok = getattr(transformers, spec.loader).from_pretrained(str(folder))
    if spec.pad_with_eos:
        tok.pad_token = tok.eos_token
    return tok


def pipeline_max_length(name: str, tok) -> int:
    """The max_length HiDreamImagePipeline passes for this tokenizer with max_sequence_length=128."""
    cap = CLIP_PIPELINE_CAP if name in ("clip_l", "clip_g") else tok.model_max_length
    return min(TEXT_LENGTH, cap)


def reference_ids(tok, prompts, max_length: int = TEXT_LENGTH) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, attention_mask) from the transformers tokenizer with the pipeline's call settings."""
    enc = tok(list(prompts), padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True)
    return enc["input_ids"], enc["attention_mask"]


def convert_tokenizer(name: str, folder: str | Path, out_dir: str | Path) -> dict:
    """Write out_dir/tokenizer.json for tokenizer `name` read from `folder`; return its manifest fields
    (all but path/files/source). Raises ExportError if the result would not reproduce the pipeline's ids."""
    import tokenizers
    import transformers

    spec = _spec(name)
    folder = Path(folder)
    tok = load_reference_tokenizer(name, folder)
    max_length = pipeline_max_length(name, tok)
    if max_length != TEXT_LENGTH:
        raise ExportError(f"{folder}: model_max_length {tok.model_max_length} is below the {TEXT_LENGTH} tokens "
                          f"the exported encoders take")
    if tok.pad_token is None or tok.pad_token_id is None:
        raise ExportError(f"{folder}: the tokenizer has no pad token")
    backend = _backend(tok, folder)
    raw = tokenizers.Tokenizer.from_str(backend.to_str())  # a copy: the reference keeps its own settings
    raw.no_padding()
    raw.no_truncation()
    bare = raw.encode("").ids  # the special tokens the post-processor adds around any prompt
    raw.enable_padding(direction=tok.padding_side, pad_id=tok.pad_token_id, pad_token=tok.pad_token,
                       length=max_length)
    raw.enable_truncation(max_length=max_length, direction=tok.truncation_side)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    raw.save(str(path), pretty=False)
    _check_same_ids(name, folder, tok, tokenizers.Tokenizer.from_file(str(path)), max_length)

    bos, eos = tok.bos_token_id, tok.eos_token_id
    return {
        "kind": "tokenizer",
        "max_length": max_length,
        "padding": {"pad_id": tok.pad_token_id, "pad_token": tok.pad_token, "direction": tok.padding_side,
                    "length": max_length},
        "truncation": True,
        "truncation_side": tok.truncation_side,
        "add_special_tokens": True,
        "add_bos": bool(bare) and bos is not None and bare[0] == bos,
        "add_eos": bool(bare) and eos is not None and bare[-1] == eos,
        "bos_token": tok.bos_token, "bos_id": bos,
        "eos_token": tok.eos_token, "eos_id": eos,
        "uses_attention_mask": spec.uses_attention_mask,
        "settings_in_file": True,  # Tokenizer.from_file(...).encode_batch(prompts) pads and truncates
        "source_class": type(tok).__name__,
        "vocab_size": raw.get_vocab_size(with_added_tokens=True),
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "hidream_export": own_version()},
    }


def _backend(tok, folder: Path):
    """The Rust tokenizer behind a transformers tokenizer (transformers 5 builds one even from vocab/merges
    or spiece.model); slow-only tokenizers are converted with transformers' converter."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend
    try:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        return convert_slow_tokenizer(tok)
    except Exception as exc:  # noqa: BLE001 - any converter failure is one message
        raise ExportError(f"{folder}: cannot convert {type(tok).__name__} to a tokenizer.json ({exc})") from None


def _check_same_ids(name: str, folder: Path, tok, saved, max_length: int) -> None:
    want_ids, want_mask = reference_ids(tok, PROBE_PROMPTS, max_length)
    got = saved.encode_batch(list(PROBE_PROMPTS))
    for prompt, enc, ids, mask in zip(PROBE_PROMPTS, got, want_ids, want_mask):
        if enc.ids != ids or enc.attention_mask != mask:
            raise ExportError(
                f"{folder}: the converted {name} tokenizer.json disagrees with {type(tok).__name__} on "
                f"{json.dumps(prompt[:40])}: ids {enc.ids[:8]}... vs {ids[:8]}...")


def _spec(name: str) -> TokenizerSpec:
    try:
        return TOKENIZERS[name]
    except KeyError:
        raise ExportError(f"unknown tokenizer {name!r}; expected one of {sorted(TOKENIZERS)}") from None
