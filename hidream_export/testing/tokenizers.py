"""Tokenizers for the tiny model folders, in the real file formats, trained at generation time on a small
built-in corpus: byte-level BPE for CLIP (a small deterministic merge learner, vocab.json + merges.txt),
a SentencePiece unigram model for T5 (spiece.model), and a byte-level BPE tokenizer.json for Llama 3.1
(the `tokenizers` trainer), with the real special tokens and ids laid out as in the real vocabularies.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

from hidream_export.variants import TEXT_LENGTH

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

__all__ = ["CORPUS", "LLAMA_SPECIALS", "LLAMA_CHAT_TEMPLATE", "write_json", "added_token", "map_token",
           "write_clip_tokenizers", "clip_vocab_and_merges", "t5_spiece_model", "llama_tokenizer_json"]

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


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def added_token(content: str, normalized: bool = False) -> dict:
    """An entry of `added_tokens_decoder` / `special_tokens_map.json` as transformers writes them."""
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


def map_token(content: str, normalized: bool = False) -> dict:
    """An entry of `special_tokens_map.json` (the same fields, without "special")."""
    entry = added_token(content, normalized)
    del entry["special"]
    return entry


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
def clip_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
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


def write_clip_tokenizers(root: Path) -> None:
    """tokenizer/ and tokenizer_2/ in the slow-tokenizer file format the real repos ship (no
    tokenizer.json). Same vocabulary for both, as for the real CLIP-L and OpenCLIP bigG. CLIP-G pads
    with "!" (id 0), CLIP-L with <|endoftext|>, following the SD3/SDXL CLIP-G tokenizer convention, so
    a runtime must read the pad token from the files rather than assume one."""
    vocab, merges = clip_vocab_and_merges()
    for sub, pad in (("tokenizer", CLIP_EOS), ("tokenizer_2", "!")):
        folder = root / sub
        write_json(folder / "vocab.json", {t: i for i, t in enumerate(vocab)})
        with open(folder / "merges.txt", "w", encoding="utf-8") as fh:
            fh.write("#version: 0.2\n")
            fh.writelines(f"{a} {b}\n" for a, b in merges)
        write_json(folder / "tokenizer_config.json", {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(vocab.index(t)): added_token(t, normalized=True)
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
        write_json(folder / "special_tokens_map.json", {
            "bos_token": map_token(CLIP_BOS, True), "eos_token": map_token(CLIP_EOS, True),
            "pad_token": map_token(pad, True), "unk_token": map_token(CLIP_EOS, True)})


@functools.lru_cache(maxsize=None)
def t5_spiece_model() -> bytes:
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
def llama_tokenizer_json() -> str:
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
