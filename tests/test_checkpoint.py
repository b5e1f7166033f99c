"""Loading checkpoints in the real layouts, and the errors for bad ones."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hidream_export.model.checkpoint import CheckpointError, load_transformer
from hidream_export.testing.checkpoints import write_transformer


def _oracle_state(folder):
    """All tensors as safetensors' own loader reads them (independent of our reader)."""
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def test_sharded_checkpoint_round_trips(tiny_transformer_dir):
    folder = tiny_transformer_dir / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    expected = _oracle_state(folder)
    for path in (tiny_transformer_dir, folder):  # parent folder or transformer/ itself
        model = load_transformer(path, dtype=torch.float32)
        got = model.state_dict()
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert torch.equal(got[k], v), k
        assert not model.training


def test_casts_on_load_and_keeps_disk_dtype_by_default(tmp_path):
    write_transformer(tmp_path / "fp16", "tiny", dtype=torch.float16)
    assert next(load_transformer(tmp_path / "fp16").parameters()).dtype == torch.float16
    model = load_transformer(tmp_path / "fp16", dtype="bf16")
    oracle = load_file(tmp_path / "fp16" / "diffusion_pytorch_model.safetensors")
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, oracle[k].to(torch.bfloat16)), k


def test_single_file_with_prefix(tmp_path, tiny_transformer_dir):
    path = tmp_path / "hidream_i1_tiny.safetensors"
    write_transformer(path, "tiny", single_file=True)
    assert all(k.startswith("model.diffusion_model.") for k in load_file(path))
    with pytest.raises(CheckpointError, match="carries no config"):
        load_transformer(path)
    model = load_transformer(path, config="tiny")
    ref = load_transformer(tiny_transformer_dir)  # same seed, same values
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_loads_through_meta_without_a_second_copy(tiny_transformer_dir):
    model = load_transformer(tiny_transformer_dir, dtype=torch.float32)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    f = dst / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    fn(state)
    save_file(state, f)
    return dst


def test_missing_unexpected_and_wrong_shaped_keys_are_listed(tmp_path):
    src = write_transformer(tmp_path / "src", "tiny")

    def damage(state):
        for k in [k for k in state if k.startswith("single_stream_blocks.1.")][:7]:
            del state[k]
        state["bogus.weight"] = torch.zeros(1)
        state["x_embedder.proj.bias"] = torch.zeros(5)

    bad = _edit(src, tmp_path / "bad", damage)
    with pytest.raises(CheckpointError) as exc:
        load_transformer(bad)
    msg = str(exc.value)
    assert str(bad) in msg
    assert "7 missing: single_stream_blocks.1." in msg and "(+2 more)" in msg
    assert "1 unexpected: bogus.weight" in msg
    assert "1 wrong-shaped: x_embedder.proj.bias [5] (expected [32])" in msg


def test_config_that_disagrees_with_weights_names_the_field(tmp_path):
    src = write_transformer(tmp_path / "src", "tiny")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_attention_heads"], cfg["attention_head_dim"] = 4, 8
    cfg["axes_dims_rope"] = [4, 2, 2]
    (src / "config.json").write_text(json.dumps(cfg))
    load_transformer(src)  # 4 heads x 8 = the same inner dim: every shape matches, so it loads
    cfg["num_attention_heads"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        load_transformer(src)
    assert "num_attention_heads*attention_head_dim=24 but x_embedder.proj.weight implies 32" in str(exc.value)
    assert str(src / "config.json") in str(exc.value)


def test_truncated_file_names_the_file(tmp_path, tiny_transformer_dir):
    folder = shutil.copytree(tiny_transformer_dir / "transformer", tmp_path / "t")
    shard = sorted(folder.glob("*-00002-of-00003.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard}: truncated safetensors file"):
        load_transformer(folder)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match=f"{shard}: corrupt safetensors header"):
        load_transformer(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a HiDream-I1 checkpoint folder"):
        load_transformer(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_transformer(tmp_path / "nope")


@pytest.mark.parametrize("src, dst", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                      (torch.float16, None)])
def test_chunked_read_gives_the_bytes_of_the_cast_tensor(tmp_path, src, dst):
    """read_tensor_chunks (the streaming export's reader) against safetensors' own loader plus torch's
    cast: same bytes, read in many small pieces none of which is the whole tensor."""
    from hidream_export.model.checkpoint import read_header, read_tensor_chunks

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(37, 53).to(src), "b": torch.randn(5).to(src)}, path)
    entries, _ = read_header(path)
    oracle = load_file(path)
    for key in ("a", "b"):
        with open(path, "rb") as fh:
            pieces = [bytes(p) for p in read_tensor_chunks(fh, entries[key], dst, chunk_bytes=100)]
        want = oracle[key].to(dst or src).contiguous().view(torch.uint8).numpy().tobytes()
        assert b"".join(pieces) == want
        assert key == "b" or (len(pieces) > 10 and max(map(len, pieces)) <= 100)


def test_chunked_read_of_a_truncated_file_names_the_file(tmp_path):
    from hidream_export.model.checkpoint import read_header, read_tensor_chunks

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, path)
    entries, _ = read_header(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 1000)
    with open(path, "rb") as fh, pytest.raises(CheckpointError, match="w.safetensors: truncated while reading 'a'"):
        list(read_tensor_chunks(fh, entries["a"], chunk_bytes=4096))
