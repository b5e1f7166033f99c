"""Shared, session-scoped fixtures: every tiny export, model folder and engine build is made once per test
run and reused by every test that only reads it (tests that change a folder copy it first)."""

import os
from collections import Counter
from types import SimpleNamespace

import pytest

# Keep CI deterministic and within its 2 cores: one thread per worker when pytest-xdist runs two.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
# The permission tests check what the tool writes under the usual umask.
os.umask(0o022)


@pytest.fixture(scope="session")
def tiny_transformer_dir(tmp_path_factory):
    """A tiny random transformer checkpoint in the real diffusers layout, sharded like the real one."""
    from hidream_export.testing.checkpoints import write_transformer

    root = tmp_path_factory.mktemp("tiny_model")
    write_transformer(root / "transformer", "tiny", seed=0, shards=3)
    return root


@pytest.fixture(scope="session")
def tiny_export(tiny_transformer_dir, tmp_path_factory):
    """(moe, variant="full") -> (out folder, ExportResult): the streaming export of the tiny checkpoint,
    made once per session."""
    from hidream_export.export.transformer import export_transformer

    cache = {}

    def get(moe: str, variant: str = "full"):
        if (moe, variant) not in cache:
            out = tmp_path_factory.mktemp(f"export_{variant}_{moe}")
            cache[moe, variant] = (out, export_transformer(tiny_transformer_dir, variant, out, moe=moe))
        return cache[moe, variant]

    return get


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """variant -> a complete tiny model folder (diffusers layout, Llama in llama/), written once."""
    from hidream_export.testing.model_folder import write_model_folder

    root = tmp_path_factory.mktemp("tiny_models")
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = write_model_folder(root / variant, variant, "tiny", seed=0)
        return cache[variant]

    return get


def _counting(monkeypatch, calls: Counter):
    """Wrap every shared-component exporter so the builds' calls can be counted."""
    from hidream_export.export import encoders as encoders_mod
    from hidream_export.export import tokenizers as tokenizers_mod
    from hidream_export.export import vae as vae_mod

    def wrap(module, attr, label):
        original = getattr(module, attr)

        def counted(name_or_folder, *args, **kwargs):
            calls[label(name_or_folder)] += 1
            return original(name_or_folder, *args, **kwargs)
        monkeypatch.setattr(module, attr, counted)

    wrap(encoders_mod, "export_encoder", lambda name: name)
    wrap(vae_mod, "export_vae_decoder", lambda folder: "vae_decoder")
    wrap(tokenizers_mod, "convert_tokenizer", lambda name: f"tokenizer_{name}")


@pytest.fixture(scope="session")
def built(tiny_models, tmp_path_factory):
    """Full, then Dev built into one engines/ root (so Dev must reuse the shared store), with the calls
    to each shared exporter counted per build; `folder(variant)` builds further variants on demand."""
    from hidream_export.build.pipeline import build_pipeline

    engines = tmp_path_factory.mktemp("engines")
    calls: Counter = Counter()
    with pytest.MonkeyPatch.context() as mp:
        _counting(mp, calls)
        full = build_pipeline(tiny_models("full"), "full", engines / "full")
        after_full = Counter(calls)
        dev = build_pipeline(tiny_models("dev"), "dev", engines / "dev")
    done = {"full": engines / "full", "dev": engines / "dev"}

    def folder(variant: str):
        if variant not in done:
            build_pipeline(tiny_models(variant), variant, engines / variant)
            done[variant] = engines / variant
        return done[variant]

    return SimpleNamespace(root=engines, full=full, dev=dev, calls_full=after_full, calls_dev=calls - after_full,
                           folder=folder)
