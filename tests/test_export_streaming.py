"""The streaming export: fake-tensor trace + weights streamed from the checkpoint."""

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hidream_export.compare.parity import random_feed
from hidream_export.export import streaming
from hidream_export.export.transformer import ExportError, export_transformer
from hidream_export.files import LOCK_NAME, sha256_file
from hidream_export.model import PRESETS
from hidream_export.model.checkpoint import expected_shapes
from hidream_export.testing.checkpoints import write_transformer


def _outputs(folder, entry, sizes=((256, 256), (336, 128))):
    session = ort.InferenceSession(str(folder / "transformer" / "model.onnx"))
    return [session.run(None, random_feed(entry, w, h, entry.batch_multiple, i))[0] for i, (w, h) in enumerate(sizes)]


@pytest.mark.parametrize("moe", ["gather", "plugin", "ort"])
def test_streamed_export_is_bit_identical_to_plain_export(tiny_transformer_dir, tiny_export, tmp_path, moe):
    s_dir, s_result = tiny_export(moe)
    streamed = s_result.component
    plain = export_transformer(tiny_transformer_dir, "full", tmp_path / "p", moe=moe, streaming=False).component
    assert streamed.streaming and not plain.streaming
    for a, b in zip(_outputs(s_dir, streamed), _outputs(tmp_path / "p", plain)):
        assert np.array_equal(a, b)
    # The block-by-block graph has the plain export's signature, named axes included.
    def signature(folder):
        graph = onnx.load(str(folder / "transformer" / "model.onnx"), load_external_data=False).graph
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in [*graph.input, *graph.output]]
    assert signature(s_dir) == signature(tmp_path / "p")
    assert signature(s_dir)[0][2] == ["2*images", 16, "2*latent_height_16px", "2*latent_width_16px"]
    # Every streamed initializer is named after a checkpoint key (or is a computed RoPE table).
    keys = set(expected_shapes(PRESETS["tiny"]))
    mapped = streamed.initializer_map
    assert {k for k, v in mapped.items() if not v.startswith("computed:")} <= keys
    assert all(k == v for k, v in mapped.items() if not v.startswith("computed:"))


@pytest.mark.slow
def test_small_preset_streamed_equals_plain(tmp_path):
    """The issue's second preset (a few hundred million parameters): same ONNX Runtime outputs, bit for
    bit, at one fixed size (fixed to keep CI quick)."""
    ckpt = tmp_path / "small"
    write_transformer(ckpt / "transformer", "small")
    kw = dict(moe="dense", min_size="256x256", max_size="256x256", opt_size="256x256")
    streamed = export_transformer(ckpt, "fast", tmp_path / "s", **kw).component
    plain = export_transformer(ckpt, "fast", tmp_path / "p", streaming=False, **kw).component
    assert streamed.initializers >= 300
    a, = _outputs(tmp_path / "s", streamed, sizes=((256, 256),))
    b, = _outputs(tmp_path / "p", plain, sizes=((256, 256),))
    assert np.array_equal(a, b)


def test_real_config_graph_without_weights(tmp_path):
    """The 17.1B graph (all 48 blocks), traced on fake tensors and stitched block by block: the saved
    graph's initializers are exactly the real checkpoint's 1615 keys with their shapes (plus the computed
    RoPE tables), each an external reference, and nothing is allocated."""
    import resource

    from hidream_export.export import blockwise
    from hidream_export.export.spec import ExportSpec
    from hidream_export.signature import batch_range, resolve_size_range
    from hidream_export.variants import get_variant

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg, v = PRESETS["real"], get_variant("dev")
    path = tmp_path / "model.onnx"
    # gather: the default lowering, with its data-dependent routing (traced once per block kind)
    spec = ExportSpec(cfg, v, resolve_size_range(v, cfg), batch_range(v), "bf16", 20, "gather")
    assert spec.max_positions == 128  # max(1360 px / 16 px per patch, twice the trained 64-patch grid)
    slots = blockwise.export_graph(spec, path, "model.onnx.data")
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert grown_gib < 2, f"tracing grew peak RSS by {grown_gib:.1f} GiB (the weights alone are 34 GB)"
    proto = onnx.load(str(path), load_external_data=False)
    external = {i.name: i for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    want = expected_shapes(cfg)
    got = {k: tuple(i.dims) for k, i in external.items() if not k.startswith("rope.")}
    assert len(want) == 1615 and got == want
    assert sorted(k for k in external if k.startswith("rope.")) == ["rope.cos1", "rope.cos2", "rope.sin1", "rope.sin2"]
    assert all(i.data_type == onnx.TensorProto.BFLOAT16 for k, i in external.items() if not k.startswith("rope."))
    # Slots tile the data file in graph order without overlap, and agree with the saved references.
    assert [s.name for s in slots] == [i.name for i in proto.graph.initializer if i.name in external]
    assert all(a.offset + a.length <= b.offset for a, b in zip(slots, slots[1:]))
    offsets = {i.name: int({e.key: e.value for e in i.external_data}["offset"]) for i in external.values()}
    assert offsets == {s.name: s.offset for s in slots}
    # One flat graph: every block is present, with its weights wired to its own nodes.
    blocks = {n.name.split("/")[0] for n in proto.graph.node}
    assert {f"double_stream_blocks.{i}" for i in range(16)} | {f"single_stream_blocks.{j}" for j in range(32)} <= blocks
    # Well-formed (topological order, unique names, references inside the data file): checked against a
    # sparse data file of the right size, which takes no disk space and is never read.
    with open(tmp_path / "model.onnx.data", "wb") as fh:
        fh.truncate(streaming.data_size(slots))
    onnx.checker.check_model(str(path))


def test_interrupted_export_resumes_and_is_never_mistaken_for_finished(tiny_transformer_dir, tiny_export, tmp_path,
                                                                        monkeypatch):
    reference = tiny_export("dense", "dev")[1].component
    out = tmp_path / "out"
    real_stream = streaming.stream_weights
    calls = collections.Counter()

    def interrupted(data_path, slots, fetch, journal, start=0, **kw):
        def failing_fetch(name):
            calls["fetched"] += 1
            if calls["fetched"] == 70:
                raise KeyboardInterrupt  # the user pressed Ctrl-C mid-way
            return fetch(name)
        return real_stream(data_path, slots, failing_fetch, journal, start=start, **kw)

    monkeypatch.setattr(streaming, "stream_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_transformer(tiny_transformer_dir, "dev", out, moe="dense")
    assert not (out / "transformer").exists()
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    assert "transformer" not in manifest.get("components", {})
    partial = [p for p in out.iterdir() if p.name.startswith(".transformer.partial-")]
    assert len(partial) == 1 and json.loads((partial[0] / "progress.json").read_text())["done"] == 64

    resumed = []
    monkeypatch.setattr(streaming, "stream_weights",
                        lambda *a, start=0, **kw: (resumed.append(start), real_stream(*a, start=start, **kw))[1])
    entry = export_transformer(tiny_transformer_dir, "dev", out, moe="dense").component
    assert resumed == [64]  # continued after the last journaled tensor
    assert entry.files["transformer/model.onnx.data"] == reference.files["transformer/model.onnx.data"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]
    again = export_transformer(tiny_transformer_dir, "dev", out, moe="dense")
    assert again.reused and resumed == [64]


def test_disk_space_and_dry_run(tiny_transformer_dir, tmp_path, monkeypatch):
    result = export_transformer(tiny_transformer_dir, "dev", tmp_path / "dry", dry_run=True)
    assert result.plan.action == "export" and "would write" in result.plan.format()
    assert "157 from the checkpoint, 4 computed" in result.plan.format()
    assert not (tmp_path / "dry").exists()
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError, match="not enough disk space"):
        export_transformer(tiny_transformer_dir, "dev", tmp_path / "full_disk")


def test_progress_is_silent_off_a_terminal(tmp_path, capsys):
    slots = [streaming.Slot("a", 0, 16, None, (4,))]
    streaming.stream_weights(tmp_path / "d", slots, lambda n: torch.zeros(4), tmp_path / "j", quiet=False)
    assert capsys.readouterr().err == ""
    assert sha256_file(tmp_path / "d")


def test_a_block_axis_pinned_by_tracing_is_an_error():
    """Block parts are traced with Dim.AUTO axes; if tracing pins one to the sample's size, the stitched
    graph would silently run at that size only. The check must say which part, input and axis."""
    from torch.export import Dim

    from hidream_export.export.blockwise import _check_dynamic

    class Pins(torch.nn.Module):
        def forward(self, x, y):
            return x.reshape(4, 3) * 2 + y.sum()  # forces x's first axis to be exactly 4

    args = (torch.randn(4, 3), torch.randn(5, 3))
    dims = ({0: Dim.AUTO}, {0: Dim.AUTO})
    program = torch.onnx.export(torch.export.export(Pins(), args, dynamic_shapes=dims, strict=False), dynamo=True,
                                input_names=["x", "y"])
    with pytest.raises(ValueError, match=r"double part: input 'x' axis 0 was traced as fixed size 4"):
        _check_dynamic("double", program, args, dims)
    _check_dynamic("double", program, args, ({}, dims[1]))  # y stayed symbolic: no complaint about it
