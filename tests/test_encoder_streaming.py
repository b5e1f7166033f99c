"""Streaming export of the large text encoders (T5, Llama): the graph is traced on fake tensors and the
weights copied tensor by tensor from the safetensors files. It must compute what the plain export computes,
and its initializer map must name a source for every external initializer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hidream_export.export import encoders as encoders_mod
from hidream_export.testing.model_folder import LLAMA_SUBDIR

SUBFOLDER = {"t5": "text_encoder_3", "llama": LLAMA_SUBDIR}


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("full")


def _feed(name: str, folder: Path) -> dict[str, np.ndarray]:
    config = encoders_mod.load_encoder(name, folder)[1]
    ids, mask = encoders_mod._sample_inputs(name, config)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _run(folder: Path, feed) -> np.ndarray:
    return ort.InferenceSession(str(folder / "model.onnx")).run(None, feed)[0]


def _external(folder: Path) -> set[str]:
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {i.name for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}


def _keys(folder: Path) -> set[str]:
    return set(encoders_mod._checkpoint_entries(folder))


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_streamed_encoder_matches_the_plain_export(model, tmp_path, name):
    folder = model / SUBFOLDER[name]
    plain = encoders_mod.export_encoder(name, folder, tmp_path / "plain", streaming=False)
    streamed = encoders_mod.export_encoder(name, folder, tmp_path / "stream")  # streaming is the default here
    assert plain["streaming"] is False and "initializer_map" not in plain
    assert streamed["streaming"] is True and streamed["exporter"] == "dynamo"
    assert "exporter_fallback" not in streamed
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "stream" / "model.onnx"))
    assert {k: v for k, v in streamed.items() if k not in ("streaming", "initializer_map", "export_seconds")} == \
        {k: v for k, v in plain.items() if k not in ("streaming", "export_seconds")}

    mapping = streamed["initializer_map"]
    assert set(mapping) == _external(tmp_path / "stream")  # every streamed initializer has a source
    keys = _keys(folder)
    computed = {n for n, src in mapping.items() if src.startswith("computed:")}
    assert all(src in keys for n, src in mapping.items() if n not in computed)

    feed = _feed(name, folder)
    got, want = _run(tmp_path / "stream", feed), _run(tmp_path / "plain", feed)
    assert got.shape == want.shape
    if name == "t5":
        assert mapping["model.encoder.embed_tokens.weight"] == "shared.weight"  # tied to `shared`
        assert computed == set()
        np.testing.assert_array_equal(got, want)
    else:
        assert mapping["model.embed_tokens.weight"] == "model.embed_tokens.weight"  # LlamaForCausalLM keys
        assert computed == {"model.rotary_emb.inv_freq"}  # non-persistent: rebuilt from the config
        # The plain export's optimizer folds the rotary cos/sin tables at export time (numpy); the streamed
        # graph computes them in ONNX Runtime from inv_freq (a weightless graph cannot fold them): the
        # tables differ in the last bit, nothing else does.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_streaming_reads_sharded_checkpoints(model, tmp_path):
    """model.safetensors.index.json + shards (how the real T5-XXL and Llama-8B ship) streams the same bytes."""
    from safetensors.torch import load_file, save_file

    src = model / SUBFOLDER["t5"]
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    one = encoders_mod.export_encoder("t5", src, tmp_path / "one")
    two = encoders_mod.export_encoder("t5", folder, tmp_path / "two")
    assert one["initializer_map"] == two["initializer_map"]
    assert (tmp_path / "one" / "model.onnx.data").read_bytes() == (tmp_path / "two" / "model.onnx.data").read_bytes()


def test_streaming_is_not_for_clip_or_torchscript(model, tmp_path):
    with pytest.raises(encoders_mod.ExportError, match="streaming export is for"):
        encoders_mod.export_encoder("clip_l", model / "text_encoder", tmp_path / "c", streaming=True)
    with pytest.raises(encoders_mod.ExportError, match="streaming export is for"):
        encoders_mod.export_encoder("t5", model / SUBFOLDER["t5"], tmp_path / "t", streaming=True,
                                    exporter="torchscript")
