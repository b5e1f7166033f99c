import os

import pytest

# Keep CI deterministic and within its 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_transformer_dir(tmp_path_factory):
    """A tiny random transformer checkpoint in the real diffusers layout, sharded like the real one."""
    from hidream_export.tiny import write_transformer

    root = tmp_path_factory.mktemp("tiny_model")
    write_transformer(root / "transformer", "tiny", seed=0, shards=3)
    return root
