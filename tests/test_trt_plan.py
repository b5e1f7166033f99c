"""The TensorRT build plan (pure), the ONNX preparation for the parser, the refit name map, and the
TensorRT-less behaviour of build_engines and the trt runtime backend.

Manifests are written the way the exporters write them (`transformer_io`, `batch_range`, the encoder and
VAE axes), so the plan is tested against the real manifest contract. One tiny `plugin` export (module
fixture) checks the ONNX side. Tests that need TensorRT carry doctor's skip reason.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from hidream_export import doctor
from hidream_export.build.plan import PREPARED_ONNX_NAME, TrtBuildOptions, make_build_plan
from hidream_export.build.prepare import plugin_functions, strip_plugin_functions, write_prepared_onnx
from hidream_export.build.refit import refit_name_map, refit_sources
from hidream_export.errors import BuildPlanError, TensorRTUnavailable
from hidream_export.lint import INFO, lint_onnx
from hidream_export.manifest import (FORMAT_VERSION, Manifest, PluginRequirement, engine_file_name, engine_key,
                                     normalize_compute_capability)
from hidream_export.moe import schema
from hidream_export.signature import batch_range, transformer_signature
from hidream_export.testing import marks
from hidream_export.variants import RECOMMENDED_SIZES, SizeRange, get_variant

TRT, SM = "11.1.0", "9.0"
REAL = SimpleNamespace(in_channels=16, out_channels=16, t5_dim=4096, num_llama_layers=32, llama_dim=4096,
                       text_emb_dim=2048, max_seq=4096)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _files(path: str, graph: str, weights: str) -> dict:
    return {path: {"sha256": _sha(graph), "bytes": 1}, path + ".data": {"sha256": _sha(weights), "bytes": 2}}


def make_manifest(variant: str, *, graph: str | None = None, weights: str | None = None,
                  size_range: SizeRange | None = None, plugin: bool = True) -> dict:
    """A manifest as `build` writes it: transformer (plugin export) + shared text encoders and VAE."""
    v = get_variant(variant)
    sr = size_range or v.size_range
    sig = transformer_signature(REAL, v, sr, batch_range(v), "bf16")
    transformer = {
        "kind": "onnx", "path": "transformer/model.onnx",
        "files": _files("transformer/model.onnx", graph or f"graph-{v.timestep_dtype}", weights or f"weights-{variant}"),
        "dtype": "bf16", "moe_lowering": "plugin" if plugin else "gather",
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in sig.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in sig.outputs],
        "axes": {k: list(r) for k, r in sig.axes.items()}, "batch_multiple": sig.batch_multiple,
        "size_range": sig.size_range.to_dict(), "max_seq": sig.max_seq,
    }
    if plugin:
        transformer["plugin"] = {"name": schema.OP_TYPE, "namespace": schema.PLUGIN_NAMESPACE,
                                 "version": schema.PLUGIN_VERSION}
    comps = {"transformer": transformer}
    for name in ("clip_l", "t5", "llama"):
        inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 128]}]
        if name != "clip_l":
            inputs.append({"name": "attention_mask", "dtype": "int64", "shape": ["batch", 128]})
        comps[name] = {"kind": "onnx", "path": f"{name}/model.onnx", "files": _files(f"{name}/model.onnx", name, name),
                       "inputs": inputs, "outputs": [], "axes": {"batch": [1, 8]}}
    comps["vae_decoder"] = {
        "kind": "onnx", "path": "vae_decoder/model.onnx", "files": _files("vae_decoder/model.onnx", "vae", "vae"),
        "inputs": [{"name": "latent", "dtype": "float32", "shape": ["batch", 16, "latent_height", "latent_width"]}],
        "outputs": [], "axes": {"batch": [1, 4], "latent_height": [32, 192], "latent_width": [32, 192]}}
    comps["tokenizer_t5"] = {"kind": "tokenizer", "path": "tokenizers/t5/tokenizer.json", "files": {}}
    return {"format_version": FORMAT_VERSION, "variant": {"name": variant}, "components": comps}


def plan_for(manifest, folder="/x/full", exists=lambda p: False, **kw):
    target = {k: kw.pop(k) for k in ("trt_version", "compute_capability", "gpu_name") if k in kw}
    target.setdefault("trt_version", TRT)
    target.setdefault("compute_capability", SM)
    if "components" in kw:
        kw["components"] = tuple(kw["components"])
    return make_build_plan(manifest, folder, TrtBuildOptions(**kw), exists=exists, **target)


def record(plan, manifest) -> dict:
    """The manifest after building `plan` (what build_engines writes), without TensorRT."""
    out = json.loads(json.dumps(manifest))
    for e in plan.engines:
        entry = Manifest.from_dict(manifest).components[e.component]
        out["components"][e.key] = e.engine_component(plan, {}, entry, 0.0).to_dict()
    return out


# ---- profiles ----------------------------------------------------------------------------------------------

def test_full_profile_batches_cfg_pairs_and_covers_the_real_size_range():
    p = plan_for(make_manifest("full")).engine("transformer")
    (dyn,) = p.profiles
    s = dyn.shapes
    assert s["hidden_states"] == {"min": (2, 16, 64, 64), "opt": (2, 16, 128, 128), "max": (8, 16, 170, 170)}
    assert s["timesteps"] == {"min": (2,), "opt": (2,), "max": (8,)}
    assert s["encoder_hidden_states_t5"] == {"min": (2, 128, 4096), "opt": (2, 128, 4096), "max": (8, 128, 4096)}
    # the Llama stack's first dim is fixed (32 layers); text length 128 everywhere
    assert s["encoder_hidden_states_llama3"] == {"min": (32, 2, 128, 4096), "opt": (32, 2, 128, 4096),
                                                 "max": (32, 8, 128, 4096)}
    assert s["pooled_embeds"]["opt"] == (2, 2048)


@pytest.mark.parametrize("variant", ["dev", "fast"])
def test_dev_fast_profiles_batch_one_per_image(variant):
    s = plan_for(make_manifest(variant)).engine("transformer").profiles[0].shapes
    assert s["hidden_states"] == {"min": (1, 16, 64, 64), "opt": (1, 16, 128, 128), "max": (4, 16, 170, 170)}
    assert s["timesteps"] == {"min": (1,), "opt": (1,), "max": (4,)}


def test_latent_opt_follows_the_ranges_opt():
    sr = SizeRange((512, 512), (1360, 1360), (768, 1024))  # (width, height)
    s = plan_for(make_manifest("dev", size_range=sr)).engine("transformer").profiles[0].shapes
    assert s["hidden_states"]["opt"] == (1, 16, 128, 96)  # latent (height, width) = (1024/8, 768/8)


def test_encoder_and_vae_profiles_cover_every_variant():
    plan = plan_for(make_manifest("full"))
    assert plan.engine("t5").profiles[0].shapes["input_ids"] == {"min": (1, 128), "opt": (1, 128), "max": (8, 128)}
    vae = plan.engine("vae_decoder").profiles[0].shapes["latent"]
    assert vae == {"min": (1, 16, 32, 32), "opt": (1, 16, 128, 128), "max": (4, 16, 192, 192)}


def test_static_profiles_at_the_recommended_sizes():
    plan = plan_for(make_manifest("full"), static_sizes=True)
    profiles = plan.engine("transformer").profiles
    assert profiles[0].name == "dynamic" and not profiles[0].is_static
    statics = profiles[1:]
    assert len(statics) == len(RECOMMENDED_SIZES) and all(p.is_static for p in statics)
    by_name = {p.name: p.shapes["hidden_states"]["opt"] for p in statics}
    assert by_name["static 1024x1024"] == (2, 16, 128, 128)
    assert by_name["static 768x1360"] == (2, 16, 170, 96)  # (width, height) -> latent (h, w)
    # a narrower range keeps only the sizes inside it
    narrow = SizeRange((768, 768), (1168, 1168), (1024, 1024))
    names = [p.name for p in plan_for(make_manifest("dev", size_range=narrow), static_sizes=True)
             .engine("transformer").profiles[1:]]
    assert names == ["static 1024x1024", "static 880x1168", "static 1168x880"]


# ---- names, flags, plugins ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cc", ["9.0", 9.0, (9, 0), "sm90", "sm_90", 90, "90"])
def test_compute_capability_forms(cc):
    assert normalize_compute_capability(cc) == "90"
    assert normalize_compute_capability((12, 0)) == "120"


def test_engine_files_carry_tensorrt_version_and_gpu():
    plan = plan_for(make_manifest("full"))
    assert engine_file_name("transformer", "11.1.0", "9.0") == "transformer.trt11.1.0.sm90.plan"
    t = plan.engine("transformer")
    assert t.output == "transformer/transformer.trt11.1.0.sm90.plan" and t.key == engine_key("transformer")
    assert t.store_path.endswith("transformer.stripped.trt11.1.0.sm90.plan") and t.store_path.startswith("../.shared/")
    assert plan.engine("clip_l").output == "clip_l/clip_l.trt11.1.0.sm90.plan"
    assert plan.timing_cache == "../.shared/timing_cache.trt11.1.0.sm90.cache"
    assert "tokenizer_t5" not in [e.component for e in plan.engines]


def test_flags_and_plugins():
    plan = plan_for(make_manifest("full"), opt_level=4, workspace_gib=8)
    t = plan.engine("transformer")
    assert t.flags == {"strongly_typed": True, "refit": True, "weight_stripped": True, "opt_level": 4,
                       "workspace_bytes": 8 * 2**30, "plugin_impl": "jit", "static_sizes": False}
    assert t.plugins == [PluginRequirement("HiDreamMoE", "hidream", "1", "jit")]
    assert t.prepared_onnx == f"transformer/{PREPARED_ONNX_NAME}"
    clip = plan.engine("clip_l")
    assert clip.flags["refit"] is False and clip.flags["weight_stripped"] is False and clip.plugins == []
    assert clip.prepared_onnx is None and clip.shared
    assert plan.plugins == t.plugins
    assert any("REFIT may drop a GEMM bias" in n for n in plan.notes)


def test_bad_options_are_refused():
    m = make_manifest("full")
    with pytest.raises(BuildPlanError, match="refittable"):
        plan_for(m, refit=False, weight_stripped=True)
    with pytest.raises(BuildPlanError, match="--opt-level"):
        plan_for(m, opt_level=7)
    with pytest.raises(BuildPlanError, match="no ONNX component"):
        plan_for(m, components=["unet"])
    bad = make_manifest("full")
    bad["components"]["t5"]["inputs"][0]["shape"] = ["batch", "sequence"]
    with pytest.raises(BuildPlanError, match="axis 'sequence'"):
        plan_for(bad)


# ---- staleness ----------------------------------------------------------------------------------------------

def test_nothing_recorded_means_build_everything_because_missing():
    plan = plan_for(make_manifest("full"))
    assert [e.action for e in plan.engines] == ["build"] * 5
    assert all(e.reasons == ["missing: no engine in the manifest"] for e in plan.engines)


def test_unchanged_engines_are_reused():
    m = make_manifest("full")
    again = plan_for(record(plan_for(m), m), exists=lambda p: True)
    assert again.up_to_date and [e.action for e in again.engines] == ["reuse"] * 5
    assert "all engines up to date" in again.format()


def _stale(change, **kw):
    """Record a plan, apply `change` to the recorded manifest, re-plan; return the plan. By default the
    files of the first build exist (engines and store entries), nothing else."""
    m = make_manifest("full")
    first = plan_for(m)
    built = {str(Path(first.folder) / p) for e in first.engines for p in (e.output, e.store_path) if p}
    recorded = record(first, m)
    change(recorded)
    return plan_for(recorded, exists=kw.pop("exists", lambda p: str(p) in built), **kw)


@pytest.mark.parametrize("change, kw, expected", [
    (lambda m: None, {"trt_version": "11.4.0"}, "different TensorRT: built with 11.1.0, this is 11.4.0"),
    (lambda m: None, {"compute_capability": "8.6"}, "different GPU: built for sm90, this is sm86"),
    (lambda m: m["components"]["transformer"]["plugin"].update(version="2"), {},
     "different plugin: built with hidream::HiDreamMoE v1, now hidream::HiDreamMoE v2"),
    (lambda m: m["components"]["transformer"]["files"]["transformer/model.onnx"].update(sha256=_sha("new graph")), {},
     "different ONNX"),
    (lambda m: None, {"opt_level": 5}, "different flags: opt_level 3 -> 5"),
    (lambda m: None, {"static_sizes": True}, "optimization profiles changed"),
    (lambda m: None, {"exists": lambda p: False}, "missing: engine file transformer/transformer.trt11.1.0.sm90.plan"),
])
def test_each_changed_input_says_why(change, kw, expected):
    t = _stale(change, **kw).engine("transformer")
    assert t.action == "build", t.reasons
    assert any(expected in r for r in t.reasons), t.reasons


def test_new_weights_refit_the_shared_stripped_engine():
    def new_weights(m):
        m["components"]["transformer"]["files"]["transformer/model.onnx.data"]["sha256"] = _sha("finetuned")
    t = _stale(new_weights).engine("transformer")
    assert t.action == "refit" and any("different weights" in r for r in t.reasons)
    # without the stripped engine in the store there is nothing to refit: build
    store_missing = lambda p: "transformer.stripped" not in str(p)  # noqa: E731
    assert _stale(new_weights, exists=store_missing).engine("transformer").action == "build"
    # an engine that is not weight-stripped is rebuilt with the new weights
    def clip_weights(m):
        m["components"]["clip_l"]["files"]["clip_l/model.onnx.data"]["sha256"] = _sha("other")
    clip = _stale(clip_weights).engine("clip_l")
    assert clip.action == "build" and any("different weights" in r for r in clip.reasons)


# ---- sharing between variants -------------------------------------------------------------------------------

def test_encoder_and_vae_engines_are_shared_between_variants():
    plans = {v: plan_for(make_manifest(v), folder=f"/x/{v}") for v in ("full", "dev", "fast")}
    for name in ("clip_l", "t5", "llama", "vae_decoder"):
        keys = {plans[v].engine(name).content_key for v in plans}
        stores = {plans[v].engine(name).store_path for v in plans}
        assert len(keys) == 1 and len(stores) == 1, name
    # Dev and Fast share a transformer graph (float32 timesteps): one stripped engine, refit per variant;
    # Full's graph differs (int64 timesteps, CFG batch)
    t = {v: plans[v].engine("transformer") for v in plans}
    assert t["dev"].content_key == t["fast"].content_key != t["full"].content_key
    assert t["dev"].weights_sha256 != t["fast"].weights_sha256


def test_second_variant_links_and_refits_what_the_first_built():
    dev = plan_for(make_manifest("dev"), folder="/x/dev")
    store = {str(Path("/x/fast") / e.store_path) for e in dev.engines}  # the dev build filled the store
    fast = plan_for(make_manifest("fast"), folder="/x/fast", exists=lambda p: str(p) in store)
    actions = {e.component: e.action for e in fast.engines}
    assert actions == {"transformer": "refit", "clip_l": "link", "t5": "link", "llama": "link", "vae_decoder": "link"}


def test_identical_refit_is_keyed_by_weights():
    dev = plan_for(make_manifest("dev"), refit="identical").engine("transformer")
    fast = plan_for(make_manifest("fast"), refit="identical").engine("transformer")
    assert dev.content_key != fast.content_key


def test_plan_format_and_dict():
    plan = plan_for(make_manifest("full"), gpu_name="NVIDIA H200", static_sizes=True)
    text = plan.format()
    for needle in ("TensorRT 11.1.0, sm90 (NVIDIA H200)", "hidream::HiDreamMoE v1 (jit)",
                   "transformer/model.trt.onnx (plugin function removed)", "profile static 1024x1024",
                   "missing: no engine in the manifest", "5 of 5 engines"):
        assert needle in text, text
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["engines"][0]["profiles"][0]["shapes"]["hidden_states"]["opt"] == [2, 16, 128, 128]


# ---- a real plugin export: preparation for the parser, lint, name map ----------------------------------

@pytest.fixture(scope="module")
def plugin_export(tiny_export, tmp_path_factory):
    """A copy of the session's plugin export (the tests write the prepared ONNX into it)."""
    import shutil

    src, result = tiny_export("plugin")
    out = tmp_path_factory.mktemp("trt_plugin_export") / "full"
    shutil.copytree(src, out)
    return out, result.component


def test_strip_removes_only_the_plugin_function(plugin_export):
    out, _ = plugin_export
    model = onnx.load(out / "transformer" / "model.onnx", load_external_data=False)
    assert plugin_functions(model) == [(schema.DOMAIN, schema.OP_TYPE)]
    stripped = strip_plugin_functions(model)
    assert len(model.functions) == 1 and len(stripped.functions) == 0  # the input is not modified
    nodes = [n for n in stripped.graph.node if n.op_type == schema.OP_TYPE]
    assert len(nodes) == len([n for n in model.graph.node if n.op_type == schema.OP_TYPE]) > 0
    assert {a.name for a in nodes[0].attribute} >= {"plugin_namespace", "plugin_version", "top_k", "num_experts"}
    assert [(o.domain, o.version) for o in stripped.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    ext = [i for i in stripped.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all(dict((e.key, e.value) for e in i.external_data)["location"] == "model.onnx.data" for i in ext)


def test_stripped_model_lints_clean_with_the_plugin_expectation(plugin_export):
    out, _ = plugin_export
    stripped = strip_plugin_functions(onnx.load(out / "transformer" / "model.onnx", load_external_data=False))
    report = lint_onnx(stripped)
    assert report.ok, report.format()
    expectations = [f for f in report.findings if f.severity == INFO and "expects plugin hidream::HiDreamMoE version 1"
                    in f.message]
    assert expectations, report.format()
    # without the plugin (nothing registered, function gone) the parser has no way in: an error
    assert not lint_onnx(stripped, plugins=[]).ok


def test_write_prepared_onnx_next_to_the_weights(plugin_export):
    out, _ = plugin_export
    src = out / "transformer" / "model.onnx"
    dst = write_prepared_onnx(src)
    assert dst == src.with_name(PREPARED_ONNX_NAME)
    prepared = onnx.load(dst, load_external_data=False)
    assert not prepared.functions and len(prepared.graph.node) == len(onnx.load(src, load_external_data=False).graph.node)
    onnx.checker.check_model(str(dst))  # path-based: finds model.onnx.data next to it
    with pytest.raises(BuildPlanError, match="next to"):
        write_prepared_onnx(src, out / PREPARED_ONNX_NAME)


def test_refit_name_map_and_sources(plugin_export):
    out, entry = plugin_export
    path = out / "transformer" / "model.onnx"
    names = refit_name_map(path)
    model = onnx.load(path, load_external_data=False)
    assert names == {i.name: i.name for i in model.graph.initializer}
    sources = refit_sources(path, entry.initializer_map)
    assert set(sources) == set(names)
    stacks = {k: v for k, v in sources.items() if "stack" in v}
    moe_nodes = [n for n in model.graph.node if n.op_type == schema.OP_TYPE]
    stacked_inputs = [name for n in moe_nodes for name in n.input[3:6] if name in names]
    # Two export layouts: weight stacks folded into initializers (plain export: generated names, traced
    # back to the checkpoint keys), or stacked inside the graph from the per-expert checkpoint tensors.
    assert set(stacks) == set(stacked_inputs)
    for n in moe_nodes:
        gate, up, down = n.input[3:6]
        if gate in stacks:
            assert stacks[gate]["role"] == "gate" and stacks[gate]["stack"][0].endswith(".experts.0.w1.weight")
            assert stacks[up]["stack"][1].endswith(".experts.1.w3.weight")
            assert stacks[down]["stack"][-1].endswith(".experts.3.w2.weight")
    if not stacks:
        experts = [k for k in names if ".experts." in k]
        assert experts and all(sources[k] == {"checkpoint": k} for k in experts)
    # checkpoint keys map to themselves; the RoPE tables are computed
    assert sources["x_embedder.proj.bias"] == {"checkpoint": "x_embedder.proj.bias"}
    assert all(v == {"computed": True} for k, v in sources.items() if k.startswith("rope."))


def test_refit_sources_trace_folded_weight_stacks():
    """The plain export folds each layer's expert stacks into initializers with generated names: the
    sources name the checkpoint tensors they were stacked from, from the node's recorded name scopes."""
    from onnx import TensorProto, helper

    E, H, I = 4, 8, 16
    inits = [helper.make_tensor(n, TensorProto.FLOAT, dims, np.zeros(int(np.prod(dims)), np.float32))
             for n, dims in (("stack_7", (E, H, I)), ("stack_8", (E, H, I)), ("stack_9", (E, I, H)),
                             ("final_layer.linear.bias", (H,)), ("rope.cos1", (4, 2)))]
    node = helper.make_node(schema.OP_TYPE, ["x", "ids", "w", "stack_7", "stack_8", "stack_9"], ["y"],
                            domain=schema.DOMAIN, **schema.node_attributes(2, E))
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes",
                            value="['', 'double_stream_blocks.1', 'double_stream_blocks.1.block.ff_i', 'HiDreamMoE_1']")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(schema.DOMAIN, 1)])
    src = refit_sources(model, {"final_layer.linear.bias": "final_layer.linear.bias"})
    assert src["stack_7"] == {"stack": [f"double_stream_blocks.1.block.ff_i.experts.{e}.w1.weight" for e in range(E)],
                              "transpose": True, "role": "gate"}
    assert src["stack_8"]["role"] == "up" and src["stack_9"]["stack"][2].endswith("experts.2.w2.weight")
    assert src["final_layer.linear.bias"] == {"checkpoint": "final_layer.linear.bias"}
    assert src["rope.cos1"] == {"computed": True}
    assert refit_name_map(model) == {i.name: i.name for i in inits}


def test_plan_from_the_real_export_manifest(plugin_export):
    out, _ = plugin_export
    manifest = json.loads((out / "manifest.json").read_text())
    plan = make_build_plan(Manifest.read(out), out, trt_version=TRT, compute_capability=SM)
    t = plan.engine("transformer")
    axes = manifest["components"]["transformer"]["axes"]
    hs = t.profiles[0].shapes["hidden_states"]
    assert hs["min"][0] == axes["batch"][0] == 2 and hs["max"][0] == axes["batch"][1] == 8 and hs["opt"][0] == 2
    assert (hs["min"][2], hs["max"][2]) == tuple(axes["latent_height"])
    opt_w, opt_h = manifest["components"]["transformer"]["size_range"]["opt"]
    assert hs["opt"][2:] == (opt_h // 8, opt_w // 8)
    assert t.plugins[0].name == "HiDreamMoE" and t.prepared_onnx == "transformer/model.trt.onnx"


# ---- without TensorRT ----------------------------------------------------------------------------------------

NO_TRT = marks.tensorrt_skip_reason() is None


@pytest.mark.skipif(NO_TRT, reason="TensorRT can build engines here")
def test_build_engines_without_tensorrt_says_so_but_dry_runs(plugin_export):
    from hidream_export.build.trt import build_engines

    out, _ = plugin_export
    result = build_engines(out, options=TrtBuildOptions(trt_version=TRT, compute_capability=SM), dry_run=True)
    assert result.dry_run and not result.done and result.plan.engine("transformer").action == "build"
    assert "dry run: nothing built" in result.format()
    if doctor.cached()["libraries"]["tensorrt"]["available"]:
        pytest.skip("TensorRT imports here (only the GPU is missing)")
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed") as err:
        build_engines(out)
    assert "hidream-export doctor" in str(err.value) and "pip install" in str(err.value)


@pytest.mark.skipif(doctor.cached()["backends"]["trt"]["available"], reason="the trt backend works here")
def test_trt_backend_without_tensorrt_is_unavailable_with_the_reason():
    from hidream_export.runtime.backends import BackendUnavailable, get_backend
    from hidream_export.runtime.trt_backend import TrtBackend

    with pytest.raises(BackendUnavailable, match="doctor"):
        TrtBackend()
    with pytest.raises(BackendUnavailable):
        get_backend("trt")


def test_trt_backend_module_imports_without_tensorrt_or_torch():
    code = ("import sys, hidream_export.runtime.trt_backend as m; "
            "print(sorted(k for k in ('torch', 'tensorrt', 'triton') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- with TensorRT (skipped with doctor's reason elsewhere) -------------------------------------------------

@marks.requires_tensorrt()
def test_engine_matches_onnxruntime(plugin_export, tiny_transformer_dir):
    """Build the tiny plugin export into a TensorRT engine and compare it with ONNX Runtime on the same feed."""
    import onnxruntime as ort

    from hidream_export.build.trt import build_engines
    from hidream_export.compare.parity import random_feed
    from hidream_export.runtime.trt_backend import TrtBackend

    out, entry = plugin_export
    result = build_engines(out)
    assert result.plan.engine("transformer").action in ("build", "reuse")
    manifest = result.manifest
    backend = TrtBackend()
    key = backend.component_key(manifest, "transformer")
    session = backend.load(manifest.file_path(out, key), manifest.components[key])
    w, h = entry.size_range.opt
    feed = random_feed(entry, w, h, 2, seed=0)
    ref = ort.InferenceSession(str(out / "transformer" / "model.onnx")).run(None, feed)[0]
    got = session.run(feed)["sample"]
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    assert session.timings and session.timings[-1]["compute_ms"] > 0


def test_cli_options_map_onto_build_engines(plugin_export, capsys):
    from hidream_export.cli import build_parser
    from hidream_export.cli import _trt_options
    from hidream_export.build.trt import build_engines

    args = build_parser().parse_args(["build", "unused", "--variant", "full", "--trt", "--dry-run", "--trt-version", TRT,
                                      "--compute-capability", "sm90", "--refit", "identical", "--opt-level", "4",
                                      "--timing-cache", "none", "--engines", "transformer"])
    opts = _trt_options(args)
    assert opts.refit == "identical" and opts.weight_stripped and opts.timing_cache is None
    manifest = Manifest.read(plugin_export[0])
    result = build_engines(plugin_export[0], manifest, options=opts, dry_run=True)  # build.pipeline passes its manifest
    t = result.plan.engine("transformer")
    assert t.flags["refit"] == "identical" and t.flags["opt_level"] == 4 and result.plan.timing_cache is None
    assert result.manifest.components.keys() == manifest.components.keys()
