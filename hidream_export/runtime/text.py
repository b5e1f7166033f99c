"""Prompts to conditioning tensors: tokenize with the four tokenizers, run the four text encoders.

Every encoder sees the prompt padded (and truncated) to 128 tokens, exactly as
diffusers' ``HiDreamImagePipeline`` tokenizes it (``padding="max_length"``, ``truncation=True``,
special tokens added; Llama pads with its EOS and prepends BOS, all recorded in the manifest and the
tokenizer.json files), then:

- pooled  = concat(CLIP-L text_embeds, CLIP-G text_embeds) on the last axis       (B, 768 + 1280)
- t5      = T5 last_hidden_state, with the attention mask                        (B, 128, 4096)
- llama   = every decoder layer's hidden state, layer-first                       (32, B, 128, 4096)

The CLIPs get no attention mask (the reference passes none); T5 and Llama get one. Prompts longer than
128 tokens are cut there with a warning naming the encoders and the dropped text, as the reference
logs one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ManifestError, RequestError
from ..manifest import TokenizerComponent
from .backends import Session

__all__ = ["ENCODERS", "Conditioning", "PromptTokenizer", "PromptTruncatedWarning", "TextEncoders"]

# Logical encoder names, as the manifest's components (and tokenizer_<name>) are called.
ENCODERS = ("clip_l", "clip_g", "t5", "llama")
# Which encoders take an attention mask (the CLIPs pool at the EOS position and get none).
_MASKED = {"t5", "llama"}
# The output each encoder contributes, by contract (engines/README.md).
_OUTPUTS = {"clip_l": "text_embeds", "clip_g": "text_embeds", "t5": "last_hidden_state", "llama": "hidden_states"}


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the encoders' 128 tokens; the end was dropped."""


class PromptTokenizer:
    """A ``tokenizers.Tokenizer`` set up as the manifest records: fixed length, padding, truncation.

    ``tokenizers.Tokenizer.encode`` takes ``&self`` and holds no per-call state, so one instance may
    be shared by threads.
    """

    def __init__(self, tokenizer: Any, name: str, max_length: int, pad_id: int, pad_token: str | None,
                 truncation: bool = True, padding_side: str = "right", truncation_side: str = "right"):
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        # The manifest's settings replace whatever the file holds, so the two cannot disagree.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if truncation:
            tokenizer.enable_truncation(max_length=max_length, direction=truncation_side)
        kwargs = {"length": max_length, "pad_id": pad_id, "direction": padding_side}
        if pad_token is not None:
            kwargs["pad_token"] = pad_token
        tokenizer.enable_padding(**kwargs)

    @classmethod
    def from_component(cls, path: Path, name: str, entry: TokenizerComponent) -> "PromptTokenizer":
        """From a manifest ``tokenizer_<name>`` entry whose tokenizer.json is `path`."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ManifestError(f"{path}: cannot load tokenizer ({' '.join(str(exc).split())})") from None
        padding = entry.padding
        pad_id = padding.get("pad_id")
        pad_token = padding.get("pad_token")
        if pad_id is None and pad_token is not None:
            pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ManifestError(f"{path}: the manifest records no padding pad_id/pad_token for {name}")
        return cls(tokenizer, name, int(entry.max_length), int(pad_id), pad_token, truncation=bool(entry.truncation),
                   padding_side=padding.get("direction", "right"), truncation_side=entry.truncation_side)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(input_ids, attention_mask) as int64 (B, max_length), and per text the dropped part (None
        when it fitted)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        dropped = [self._dropped(e) for e in encodings]
        if ids.shape != (len(texts), self.max_length):
            raise ManifestError(f"tokenizer {self.name}: got shape {ids.shape}, expected "
                             f"({len(texts)}, {self.max_length}); is padding set up in its tokenizer.json?")
        return ids, mask, dropped

    def _dropped(self, encoding: Any) -> str | None:
        if not encoding.overflowing:
            return None
        pieces = [self.tokenizer.decode(o.ids, skip_special_tokens=True) for o in encoding.overflowing]
        # A tokenizer.json without a decoder hands back raw byte-level pieces: make them readable.
        text = " ".join(p.strip() for p in pieces if p.strip()).replace("</w>", " ").replace("\u0120", " ")
        return " ".join(text.split()) or "(special tokens)"


@dataclass
class Conditioning:
    """What the transformer is conditioned on, for a batch of prompts (float32 unless the encoders
    return another float type)."""

    t5: np.ndarray  # (B, 128, t5_dim)
    llama: np.ndarray  # (n_layers, B, 128, llama_dim)
    pooled: np.ndarray  # (B, clip_l_dim + clip_g_dim)

    @property
    def batch(self) -> int:
        return self.t5.shape[0]

    def take(self, rows: Sequence[int]) -> "Conditioning":
        """The conditioning of some prompts only, in the order given."""
        return Conditioning(t5=self.t5[rows], llama=self.llama[:, rows], pooled=self.pooled[rows])


class TextEncoders:
    """The four tokenizers and encoder sessions; ``encode(prompts)`` -> Conditioning."""

    def __init__(self, tokenizers: Mapping[str, PromptTokenizer], sessions: Mapping[str, Session],
                 fixed_batch: Mapping[str, int | None] | None = None):
        missing = [n for n in ENCODERS if n not in tokenizers or n not in sessions]
        if missing:
            raise ManifestError(f"text encoders incomplete: no tokenizer or session for {missing}")
        self.tokenizers = dict(tokenizers)
        self.sessions = dict(sessions)
        # An encoder exported with a static batch (an int in its manifest shape) is run row by row.
        self.fixed_batch = dict(fixed_batch or {})

    def tokenize(self, prompts: Sequence[str], stacklevel: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Token ids and masks per encoder; warns (PromptTruncatedWarning) about truncated prompts,
        attributed ``stacklevel`` frames up (2: the caller of tokenize)."""
        tokens, cut = {}, {}
        for name in ENCODERS:
            ids, mask, dropped = self.tokenizers[name](prompts)
            tokens[name] = (ids, mask)
            for k, d in enumerate(dropped):
                if d is not None:
                    cut.setdefault(k, []).append((name, d))
        for k, where in cut.items():
            names = ", ".join(n for n, _ in where)
            limit = self.tokenizers[where[0][0]].max_length
            # The longest dropped part (the tokenizer that keeps least) says most about what was lost.
            lost = max((d for _, d in where), key=len)
            shown = lost if len(lost) <= 60 else f"{lost[:60]}... ({len(lost)} characters)"
            warnings.warn(
                f"prompt {prompts[k][:40]!r}... is longer than {limit} tokens for {names}; the end was dropped: "
                f"{shown!r}", PromptTruncatedWarning, stacklevel=stacklevel)
        return tokens

    def _run(self, name: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        session = self.sessions[name]
        feeds = {"input_ids": ids}
        if name in _MASKED:
            feeds["attention_mask"] = mask
        want = _OUTPUTS[name]
        fixed = self.fixed_batch.get(name)
        batch_axis = 1 if name == "llama" else 0
        if fixed is None or fixed == ids.shape[0]:
            return self._pick(session.run(feeds), want, name)
        if fixed != 1:
            raise RequestError(f"{name} was exported for a fixed batch of {fixed}; cannot encode {ids.shape[0]} prompts")
        rows = [self._pick(session.run({k: v[i:i + 1] for k, v in feeds.items()}), want, name)
                for i in range(ids.shape[0])]
        return np.concatenate(rows, axis=batch_axis)

    @staticmethod
    def _pick(outputs: Mapping[str, np.ndarray], want: str, name: str) -> np.ndarray:
        if want in outputs:
            return outputs[want]
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        raise ManifestError(f"{name} encoder returned {sorted(outputs)}, not {want!r}")

    def encode(self, prompts: Sequence[str], timings: Any = None, stacklevel: int = 2) -> Conditioning:
        """Encode a batch of prompts in one call per encoder. ``timings``: a report.Timings (optional),
        which gets one entry per encoder and one for tokenizing. ``stacklevel``: as in tokenize."""
        from .report import Timings

        timings = timings if timings is not None else Timings()
        with timings.measure("tokenize"):
            tokens = self.tokenize(prompts, stacklevel + 1)
        out = {}
        for name in ENCODERS:
            with timings.measure(f"encode_{name}"):
                out[name] = self._run(name, *tokens[name])
        pooled = np.concatenate([out["clip_l"], out["clip_g"]], axis=-1)
        return Conditioning(t5=out["t5"], llama=out["llama"], pooled=pooled)
