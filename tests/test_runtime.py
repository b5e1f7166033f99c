"""The torch-free runtime on small hand-written engine folders (no build, no torch in the runtime).

`make_fake_engine` writes a folder exactly as engines/README.md lays it out, but every model is a few
ONNX ops written with onnx.helper and every tokenizer a small byte-level BPE trained on the spot: the
numbers are meaningless, the contract (names, shapes, dtypes, manifest, hashes) is the real one. The
models still depend on everything they are fed (prompt tokens, masks, timesteps, latents), so seeds,
CFG and prompts change the image. tests/test_runtime_e2e.py compares real builds with diffusers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hidream_export.cli import main as cli_main
from hidream_export.files import atomic_write_json as write_json_atomic
from hidream_export.files import file_record
from hidream_export.manifest import FORMAT_VERSION, ManifestError, OnnxComponent
from hidream_export.runtime import (Backend, BackendUnavailable, OrtBackend, Pipeline, PromptTruncatedWarning,
                                    get_backend)
from hidream_export.runtime.backends import OrtSession
from hidream_export.runtime.device import DeviceArray
from hidream_export.variants import get_variant

REPO = Path(__file__).resolve().parents[1]
L = 128  # tokens
C = 4  # latent channels
T5_DIM, LLAMA_DIM, N_LLAMA = 4, 4, 2
CLIP_L, CLIP_G = 3, 5
SIZE_MIN, SIZE_MAX, SIZE_OPT = (64, 64), (256, 256), (128, 128)
MAX_RESOLUTION = (16, 16)  # latent cells: default side 128 px, max_seq (16/2)^2 = 64 tokens
MAX_SEQ = 64
OPSET = 17

CORPUS = ["a cat holding a sign", "a painting of a squirrel eating a burger", "red apples on a wooden table",
          "an astronaut riding a horse on the moon", "The quick brown fox jumps over the lazy dog 0123456789!"]


# --- the fake engine folder ---------------------------------------------------------------------------

def file_hashes(folder: Path, files: list[str]) -> dict:
    return {f: file_record(folder / f) for f in files}


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9  # what every onnxruntime >= 1.18 reads
    onnx.checker.check_model(model)
    return model


def _const(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _clip(width, salt):
    """input_ids -> text_embeds (B, width): sin(mean(ids)/100 * w)."""
    return _model(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f"], ["m"], axes=[1], keepdims=1),
         helper.make_node("Mul", ["m", "w"], ["p"]),
         helper.make_node("Sin", ["p"], ["text_embeds"])],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", L])],
        [helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["batch", width])],
        [_const("w", (np.arange(1, width + 1) * 0.01 + salt)[None])])


def _masked_ids(extra_nodes, out_name, out_shape, w, unsqueeze):
    """input_ids, attention_mask -> sin(ids * mask / 100 * w) with the ids unsqueezed to broadcast."""
    return _model(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["f", "mf"], ["fm"]),
         helper.make_node("Unsqueeze", ["fm", "axes"], ["u"]),
         helper.make_node("Mul", ["u", "w"], ["p"]),
         helper.make_node("Sin", ["p"], [out_name]), *extra_nodes],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", L]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", L])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        [_const("w", w), _const("axes", unsqueeze, np.int64)])


def _transformer(t_type):
    """sample = conv1x1(x, mix) + tanh(w * (mean(pooled) + mean(t5) + mean(llama) + t/1000)), per batch row.

    The channel mix is the one initializer big enough to go to model.onnx.data, like real weights."""
    nodes = [
        helper.make_node("ReduceMean", ["pooled_embeds"], ["p"], axes=[1], keepdims=0),
        helper.make_node("ReduceMean", ["encoder_hidden_states_t5"], ["a"], axes=[1, 2], keepdims=0),
        helper.make_node("ReduceMean", ["encoder_hidden_states_llama3"], ["l"], axes=[0, 2, 3], keepdims=0),
        helper.make_node("Cast", ["timesteps"], ["tf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["tf", "milli"], ["tt"]),
        helper.make_node("Add", ["p", "a"], ["s1"]),
        helper.make_node("Add", ["s1", "l"], ["s2"]),
        helper.make_node("Add", ["s2", "tt"], ["s"]),
        helper.make_node("Unsqueeze", ["s", "axes"], ["s4"]),
        helper.make_node("Mul", ["s4", "w"], ["sw"]),
        helper.make_node("Tanh", ["sw"], ["th"]),
        helper.make_node("Conv", ["hidden_states", "mix"], ["xh"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["xh", "th"], ["sample"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT,
                                       ["batch", C, "latent_height", "latent_width"]),
         helper.make_tensor_value_info("timesteps", t_type, ["batch"]),
         helper.make_tensor_value_info("encoder_hidden_states_t5", TensorProto.FLOAT, ["batch", L, T5_DIM]),
         helper.make_tensor_value_info("encoder_hidden_states_llama3", TensorProto.FLOAT,
                                       [N_LLAMA, "batch", L, LLAMA_DIM]),
         helper.make_tensor_value_info("pooled_embeds", TensorProto.FLOAT, ["batch", CLIP_L + CLIP_G])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", C, "latent_height", "latent_width"])],
        [_const("w", np.linspace(0.5, 2.0, C).reshape(1, C, 1, 1)), _const("milli", 0.001),
         _const("mix", (0.5 * np.eye(C) + 0.05 * np.arange(C * C).reshape(C, C) / C).reshape(C, C, 1, 1)),
         _const("axes", [1, 2, 3], np.int64)])


def _vae():
    """latent -> image: the first 3 channels, 8x nearest upsampling, sigmoid into [0, 1]."""
    return _model(
        [helper.make_node("Slice", ["latent", "starts", "ends", "axes"], ["rgb"]),
         helper.make_node("Resize", ["rgb", "", "scales"], ["big"], mode="nearest"),
         helper.make_node("Sigmoid", ["big"], ["image"])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", C, "latent_height", "latent_width"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [_const("starts", [0], np.int64), _const("ends", [3], np.int64), _const("axes", [1], np.int64),
         _const("scales", [1, 1, 8, 8])])


def _tokenizer(pad_token, bos="<s>", eos="</s>"):
    """A byte-level BPE (no unknown tokens) that adds BOS/EOS, like the real ones' post-processors."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([pad_token, bos, eos]))
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    return tok


def _io(model):
    def spec(v):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": dims}
    return {"inputs": [spec(v) for v in model.graph.input], "outputs": [spec(v) for v in model.graph.output]}


def make_fake_engine(folder: Path, variant: str = "fast", scheduler_config: bool = True) -> Path:
    """An engine folder per engines/README.md with hand-written models (see the module docstring)."""
    v = get_variant(variant)
    folder.mkdir(parents=True)
    components = {}
    t_type = TensorProto.INT64 if v.timestep_dtype == "int64" else TensorProto.FLOAT
    models = {
        "transformer": _transformer(t_type),
        "clip_l": _clip(CLIP_L, 0.0),
        "clip_g": _clip(CLIP_G, 0.5),
        "t5": _masked_ids([], "last_hidden_state", ["batch", L, T5_DIM], np.linspace(0.01, 0.04, T5_DIM), [2]),
        "llama": _masked_ids([], "hidden_states", [N_LLAMA, "batch", L, LLAMA_DIM],
                             np.linspace(0.01, 0.08, N_LLAMA * LLAMA_DIM).reshape(N_LLAMA, 1, 1, LLAMA_DIM), [0, 3]),
        "vae_decoder": _vae(),
    }
    for name, model in models.items():
        (folder / name).mkdir()
        files = [f"{name}/model.onnx"]
        if name == "transformer":  # the real transformer always keeps its weights outside the protobuf
            onnx.save_model(model, folder / files[0], save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=80)  # bytes incl. Python overhead: only "mix"
            files.append(f"{name}/model.onnx.data")
        else:
            onnx.save_model(model, folder / files[0])
        components[name] = {"kind": "onnx", "path": files[0], "files": file_hashes(folder, files), "dtype": "fp32",
                            **_io(model), "opset": OPSET}
    batch_min = v.cfg_batch_factor
    components["transformer"].update({
        "axes": {"batch": [batch_min, 4 * batch_min],
                 "latent_height": [SIZE_MIN[1] // 8, SIZE_MAX[1] // 8],
                 "latent_width": [SIZE_MIN[0] // 8, SIZE_MAX[0] // 8]},
        "batch_multiple": batch_min, "max_seq": MAX_SEQ,
        "size_range": {"min": list(SIZE_MIN), "max": list(SIZE_MAX), "opt": list(SIZE_OPT)},
        "config": {"patch_size": 2, "in_channels": C, "out_channels": C, "max_resolution": list(MAX_RESOLUTION)},
        "moe_lowering": "none"})
    components["vae_decoder"].update({"scaling_factor": 0.3611, "shift_factor": 0.1159})

    for name, pad, bos in (("clip_l", "<pad>", "<s>"), ("clip_g", "!", "<s>"), ("t5", "<pad>", "<s>"),
                           ("llama", "</s>", "<s>")):  # Llama pads with its EOS
        rel = f"tokenizers/{name}/tokenizer.json"
        (folder / rel).parent.mkdir(parents=True)
        tok = _tokenizer(pad, bos)
        tok.save(str(folder / rel))
        components[f"tokenizer_{name}"] = {
            "kind": "tokenizer", "path": rel, "files": file_hashes(folder, [rel]), "max_length": L,
            "padding": {"pad_id": tok.token_to_id(pad), "pad_token": pad}, "truncation": True}

    if scheduler_config:
        rel = "scheduler/scheduler_config.json"
        if v.diffusers_scheduler == "UniPCMultistepScheduler":
            config = {"_class_name": v.diffusers_scheduler, "use_flow_sigmas": True, "flow_shift": v.shift,
                      "prediction_type": "flow_prediction", "num_train_timesteps": 1000}
        else:
            config = {"_class_name": v.diffusers_scheduler, "shift": v.shift, "num_train_timesteps": 1000,
                      "use_dynamic_shifting": False}
        write_json_atomic(folder / rel, config)
        components["scheduler"] = {"kind": "scheduler", "path": rel, "files": file_hashes(folder, [rel])}

    manifest = {"format_version": FORMAT_VERSION, "variant": {"name": v.name}, "components": components}
    write_json_atomic(folder / "manifest.json", manifest)
    return folder


@pytest.fixture(scope="module")
def fast_dir(tmp_path_factory):
    return make_fake_engine(tmp_path_factory.mktemp("engines") / "fast", "fast")


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    return make_fake_engine(tmp_path_factory.mktemp("engines") / "full", "full", scheduler_config=False)


@pytest.fixture(scope="module")
def fast(fast_dir):
    return Pipeline.from_dir(fast_dir, threads=1, progress=False)


@pytest.fixture(scope="module")
def full(full_dir):
    return Pipeline.from_dir(full_dir, threads=1, progress=False)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


class CountingBackend(OrtBackend):
    """onnxruntime that records every session run, to show that bad requests fail before any."""

    def __init__(self):
        super().__init__(threads=1)
        self.calls: list[str] = []

    def load(self, path, entry):
        inner, calls = super().load(path, entry), self.calls

        class Counting:
            input_names, output_names = inner.input_names, inner.output_names

            def run(self, feeds):
                calls.append(entry["path"])
                return inner.run(feeds)

        return Counting()


# --- torch-free -----------------------------------------------------------------------------------------

def test_import_and_generation_do_not_import_torch(fast_dir, tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        start = time.perf_counter()
        import hidream_export.runtime as rt
        import_s = time.perf_counter() - start
        pipe = rt.Pipeline.from_dir({str(fast_dir)!r}, threads=1)
        result = pipe("a cat holding a sign", seed=3, steps=2)
        result.image.save({str(tmp_path / "x.png")!r})
        heavy = sorted(m for m in ("torch", "diffusers", "transformers", "onnx") if m in sys.modules)
        print("HEAVY", heavy, "IMPORT_S", round(import_s, 3))
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout
    assert (tmp_path / "x.png").exists()


# --- manifest refusals ----------------------------------------------------------------------------------

def test_refuses_a_folder_without_manifest(fast_dir, tmp_path):
    folder = copy_of(fast_dir, tmp_path)
    (folder / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        Pipeline.from_dir(folder)


def test_refuses_a_newer_manifest_format(fast_dir, tmp_path):
    folder = copy_of(fast_dir, tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"format {FORMAT_VERSION + 1} is newer"):
        Pipeline.from_dir(folder)


def test_refuses_a_file_whose_hash_does_not_match_naming_it(fast_dir, tmp_path):
    folder = copy_of(fast_dir, tmp_path)
    data = folder / "transformer" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # same size: only the hash can tell
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"transformer/model\.onnx\.data: does not match the SHA-256"):
        Pipeline.from_dir(folder)
    # verify=False trusts the bytes but still checks sizes, so it loads.
    Pipeline.from_dir(folder, verify=False)


@pytest.mark.parametrize("rel", ["vae_decoder/model.onnx", "tokenizers/llama/tokenizer.json",
                                 "scheduler/scheduler_config.json"])
def test_refuses_a_missing_file_naming_it(fast_dir, tmp_path, rel):
    folder = copy_of(fast_dir, tmp_path)
    (folder / rel).unlink()
    with pytest.raises(ManifestError, match=rf"{rel}: missing"):
        Pipeline.from_dir(folder)
    with pytest.raises(ManifestError, match=rf"{rel}: missing"):
        Pipeline.from_dir(folder, verify=False)


def test_refuses_a_missing_component(fast_dir, tmp_path):
    folder = copy_of(fast_dir, tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    del data["components"]["llama"]
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="no component 'llama'"):
        Pipeline.from_dir(folder)


def test_scheduler_config_of_another_variant_is_refused(fast_dir, tmp_path):
    folder = copy_of(fast_dir, tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({"_class_name": "FlowMatchLCMScheduler", "shift": 6.0}))  # Dev's shift
    data["components"]["scheduler"]["files"] = file_hashes(folder, ["scheduler/scheduler_config.json"])
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="shift 3.0, but the config has shift 6.0"):
        Pipeline.from_dir(folder)


def test_bad_scheduler_flavour_is_refused(fast_dir):
    with pytest.raises(ValueError, match="unknown scheduler flavour"):
        Pipeline.from_dir(fast_dir, scheduler_flavour="karras")


# --- backends ---------------------------------------------------------------------------------------------

def test_backend_registry():
    assert isinstance(get_backend("ort"), OrtBackend)
    with pytest.raises(ValueError, match="--backend 'cuda' is not one of"):
        get_backend("cuda")
    with pytest.raises(BackendUnavailable, match="no \\['NoSuchExecutionProvider'\\]"):
        OrtBackend(providers=["NoSuchExecutionProvider"])


def test_trt_backend_without_tensorrt_says_to_use_ort():
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed.*(backend='ort'|--backend ort)"):
        get_backend("trt")


def test_ort_session_casts_feeds_and_handles_bfloat16(tmp_path):
    import ml_dtypes  # noqa: F401  (a runtime dependency)
    # onnxruntime's CPU kernels barely do bfloat16 arithmetic; Cast they do.
    model = _model([helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
                    helper.make_node("Add", ["f", "f"], ["f2"]),
                    helper.make_node("Cast", ["f2"], ["y"], to=TensorProto.BFLOAT16)],
                   [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n"])],
                   [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n"])])
    onnx.save_model(model, tmp_path / "m.onnx")
    session = OrtBackend(threads=1).load(tmp_path / "m.onnx", OnnxComponent("m.onnx", {}))
    assert isinstance(session, OrtSession)
    y = session.run({"x": np.array([1.5, -2.25, 3.0], dtype=np.float32)})["y"]
    assert y.dtype.name == "bfloat16"
    np.testing.assert_array_equal(y.astype(np.float32), [3.0, -4.5, 6.0])
    with pytest.raises(ValueError, match=r"missing \['x'\], unexpected \['z'\]"):
        session.run({"z": np.zeros(1, np.float32)})


# --- requests checked before any work ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def counted(fast_dir):
    backend = CountingBackend()
    return Pipeline.from_dir(fast_dir, backend=backend, progress=False), backend


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompt=None), TypeError, "prompt must be a str, got NoneType"),
    (dict(prompt=["a", "b"]), TypeError, "prompt must be a str, got list"),
    (dict(negative_prompt=3), TypeError, "negative_prompt must be a str or None, got int"),
    (dict(width=272, height=272, any_size=True), ValueError,
     r"width=272 is outside the exported range 64x64 \.\. 256x256"),
    (dict(width=48, height=64, any_size=True), ValueError, r"outside the exported range 64x64 \.\. 256x256"),
    (dict(width=130, height=128, any_size=True), ValueError, "width=130 is not a multiple of 16"),
    (dict(width=256, height=240, any_size=True), ValueError, r"not square and needs 240 image tokens.*max_seq=64"),
    (dict(width=1024, height=64), ValueError, r"width=512 is outside the exported range"),  # ~1 MP rule: 512x32
    (dict(width=128.0), TypeError, "width must be an integer"),
    (dict(steps=0), ValueError, "steps must be an integer >= 1"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
    (dict(seed=-1), ValueError, "seed must be a non-negative integer"),
    (dict(latents=np.zeros((1, C, 8, 8), np.float32)), ValueError,
     r"latents must be a float array of shape \(1, 4, 16, 16\)"),
    (dict(noise=[None]), ValueError, r"noise must hold one array per step \(16\)"),
    (dict(callback="print"), TypeError, "callback must be callable"),
])
def test_bad_requests_fail_before_any_model_runs(counted, kwargs, error, match):
    pipe, backend = counted
    kwargs = {"prompt": "a cat", **kwargs}
    backend.calls.clear()
    with pytest.raises(error, match=match):
        pipe(**kwargs)
    assert backend.calls == []


def test_noise_is_refused_for_the_deterministic_full_scheduler(full):
    with pytest.raises(ValueError, match="deterministic"):
        full("a cat", steps=2, noise=[None, None])


# --- sizes ---------------------------------------------------------------------------------------------------

def test_size_rule_rescales_to_the_model_area_unless_any_size(fast):
    # The fake transformer's max_resolution (16 latent cells) makes 128 px its "1 MP" side.
    assert fast.transformer_info.default_side == 128
    assert fast.resolve_size() == (128, 128)
    assert fast.resolve_size(256, 256) == (128, 128)  # every request is rescaled, as the references do
    assert fast.resolve_size(64, 64) == (128, 128)
    assert fast.resolve_size(192, 128) == (144, 96)  # aspect kept: sqrt(128^2 / (192 * 128)) scale, floor to 16
    assert fast.resolve_size(any_size=True) == (128, 128)
    assert fast.resolve_size(256, 256, any_size=True) == (256, 256)  # square: allowed beyond max_seq
    assert fast.resolve_size(96, 64, any_size=True) == (96, 64)


def test_generated_image_has_the_resolved_size(fast):
    r = fast("a cat", seed=1, steps=2)
    assert r.image.size == (128, 128) and (r.width, r.height) == (128, 128)
    r = fast("a cat", width=96, height=64, any_size=True, seed=1, steps=2, return_latents=True)
    assert r.image.size == (96, 64) and r.array.shape == (64, 96, 3)
    assert r.latents.shape == (1, C, 8, 12)


# --- determinism and semantics ---------------------------------------------------------------------------

def test_same_seed_same_image_different_seed_different_image(fast, full):
    for pipe in (fast, full):
        a = pipe("a cat holding a sign", seed=7, steps=3)
        b = pipe("a cat holding a sign", seed=7, steps=3)
        c = pipe("a cat holding a sign", seed=8, steps=3)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.image.tobytes() != c.image.tobytes()
        assert a.image.mode == "RGB"


def test_random_seed_is_reported_and_reproduces(fast):
    a = fast("a cat", steps=2)
    assert isinstance(a.seed, int)
    b = fast("a cat", steps=2, seed=a.seed)
    assert a.image.tobytes() == b.image.tobytes()


def test_one_generator_draws_latents_then_each_steps_noise(fast):
    """The documented draw order: seed -> PCG64 -> initial latents, then one draw per step."""
    steps = 3
    rng = np.random.Generator(np.random.PCG64(11))
    latents = rng.standard_normal((1, C, 16, 16), dtype=np.float32)
    noise = [rng.standard_normal((1, C, 16, 16), dtype=np.float32) for _ in range(steps)]
    seeded = fast("a cat", seed=11, steps=steps, return_latents=True)
    injected = fast("a cat", steps=steps, latents=latents, noise=noise, return_latents=True)
    assert injected.seed is None
    np.testing.assert_array_equal(seeded.latents, injected.latents)


def test_sampling_loop_against_a_numpy_reference(fast):
    """Velocity = -output, flash Euler step with the injected noise, VAE, rounding: recomputed here."""
    steps = 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, C, 16, 16), dtype=np.float32)
    noise = [rng.standard_normal(x.shape, dtype=np.float32) for _ in range(steps)]
    got = fast("a cat", steps=steps, latents=x, noise=noise, return_latents=True)

    cond = fast.text_encoders.encode(["a cat"])
    sched = fast.make_scheduler(steps)
    transformer = fast.sessions["transformer"]
    for i, t in enumerate(sched.timesteps):
        out = transformer.run({"hidden_states": x, "timesteps": np.array([t], np.float32),
                               "encoder_hidden_states_t5": cond.t5, "encoder_hidden_states_llama3": cond.llama,
                               "pooled_embeds": cond.pooled})["sample"]
        x0 = x - sched.sigmas[i] * -out
        x = x0 if sched.sigmas[i + 1] == 0 else (1 - sched.sigmas[i + 1]) * x0 + sched.sigmas[i + 1] * noise[i]
    np.testing.assert_allclose(got.latents, x, rtol=1e-6, atol=1e-6)
    image = 1 / (1 + np.exp(-x[0, :3].repeat(8, 1).repeat(8, 2)))
    expected = (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert np.abs(np.asarray(got.image).astype(int) - expected).max() <= 1


def test_cfg_runs_negative_then_positive_and_combines(full):
    """Full: the transformer sees [negative, positive]; guidance <= 1 is one conditional row."""
    x = np.random.default_rng(1).standard_normal((1, C, 16, 16), dtype=np.float32)
    seen = []
    inner = full.sessions["transformer"]

    class Spy:
        input_names, output_names = inner.input_names, inner.output_names

        def run(self, feeds):
            seen.append({k: np.array(v) for k, v in feeds.items()})
            return inner.run(feeds)

        def run_bound(self, feeds, device):  # the I/O-bound loop (the default on the ort backend)
            seen.append({k: v.numpy() if isinstance(v, DeviceArray) else np.array(v) for k, v in feeds.items()})
            return inner.run_bound(feeds, device)

    full.sessions["transformer"] = Spy()
    try:
        r5 = full("a cat", steps=2, guidance_scale=5.0, latents=x, return_latents=True)
        r5_neg = full("a cat", negative_prompt="a dog", steps=2, guidance_scale=5.0, latents=x)
        r1 = full("a cat", steps=2, guidance_scale=1.0, latents=x)
    finally:
        full.sessions["transformer"] = inner
    first = seen[0]
    assert first["hidden_states"].shape[0] == 2 and first["timesteps"].dtype == np.int64
    cond = full.text_encoders.encode(["", "a cat"])
    np.testing.assert_array_equal(first["pooled_embeds"], cond.pooled)
    np.testing.assert_array_equal(first["encoder_hidden_states_llama3"], cond.llama)  # batch on axis 1
    out = inner.run(first)["sample"]
    v = -out
    v = v[0:1] + np.float32(5.0) * (v[1:2] - v[0:1])
    sched = full.make_scheduler(2)
    np.testing.assert_allclose(sched.step(v, 0, x), _first_step_latents(full, x), rtol=1e-6, atol=1e-6)
    assert r5.negative_prompt == "" and r5.info["cfg"]
    assert r5.image.tobytes() != r5_neg.image.tobytes()  # the negative prompt matters
    # No CFG on a Full export (batch range 2..8): one row padded to the pair, only the first is used.
    assert seen[-1]["hidden_states"].shape[0] == 2 and r1.negative_prompt is None and not r1.info["cfg"]


def _first_step_latents(pipe, x):
    captured = []
    pipe("a cat", steps=2, guidance_scale=5.0, latents=x, callback=lambda i, t, lat: captured.append(lat.copy()))
    return captured[0]


def test_long_prompt_is_truncated_with_a_warning(fast):
    long_prompt = " ".join(["a painting of a squirrel eating a burger"] * 30)
    with pytest.warns(PromptTruncatedWarning, match="longer than 128 tokens for clip_l, clip_g, t5, llama") as record:
        r = fast(long_prompt, seed=0, steps=2)
    assert record[0].filename == __file__  # attributed to the caller, not to the runtime
    assert r.image.size == (128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast("a short prompt", seed=0, steps=2)


def test_empty_prompts_are_allowed(full):
    assert full("", negative_prompt="", steps=2, seed=0).image.size == (128, 128)


def test_timings_cover_every_stage(fast):
    r = fast("a cat", seed=0, steps=3)
    t = r.timings
    for stage in ("tokenize", "encode_clip_l", "encode_clip_g", "encode_t5", "encode_llama", "vae", "total"):
        assert t.count(stage) == 1, stage
    assert t.count("transformer") == t.count("step") == t.count("scheduler") == 3
    assert 0 <= t.sampler_overhead() < 1
    assert "| transformer |" in t.table().replace("  ", " ") or "transformer" in t.table()
    report = r.report()
    json.dumps(report)
    assert report["seed"] == 0 and report["variant"] == "fast" and report["timings"]["stages"]["step"]["calls"] == 3


def test_official_flavour_keeps_the_last_sample(fast_dir):
    """The official repository's flash scheduler returns the noisy sample at sigma_{N-1} on its last step
    instead of the x0 prediction."""
    official = Pipeline.from_dir(fast_dir, scheduler_flavour="official", threads=1, progress=False)
    x = np.random.default_rng(2).standard_normal((1, C, 16, 16), dtype=np.float32)
    captured = []
    r = official("a cat", steps=2, latents=x, seed=5, return_latents=True,
                 callback=lambda i, t, lat: captured.append(lat.copy()))
    np.testing.assert_array_equal(captured[-1], r.latents)
    np.testing.assert_array_equal(captured[0], captured[1])  # the last step changed nothing


def test_shared_pipeline_across_threads_is_deterministic(fast):
    results = {}

    def work(k):
        results[k] = fast("a cat holding a sign", seed=42, steps=2).image.tobytes()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(results.values())) == 1


def test_backend_instance_and_custom_backend_hook(fast_dir):
    class Picky(OrtBackend):
        thread_safe = False  # the pipeline must serialise calls

        def component_key(self, manifest, name):
            assert name in manifest.components
            return name

    pipe = Pipeline.from_dir(fast_dir, backend=Picky(threads=1), progress=False)
    assert pipe("a cat", seed=0, steps=1).image.size == (128, 128)
    assert isinstance(pipe.backend, Backend)


# --- CLI helpers ---------------------------------------------------------------------------------------------

def generate(argv):
    return cli_main(["generate", *argv])


def test_generate_command_writes_image_and_report(fast_dir, tmp_path, capsys):
    out, report = tmp_path / "img" / "cat.png", tmp_path / "report.json"
    assert generate([str(fast_dir), "--prompt", "a cat", "--seed", "4", "--steps", "2", "--width", "96",
                     "--height", "64", "--any-size", "--json", str(report), "-o", str(out), "--threads", "1"]) == 0
    from PIL import Image

    assert Image.open(out).size == (96, 64)
    data = json.loads(report.read_text())
    assert data["seed"] == 4 and data["width"] == 96 and data["steps"] == 2 and data["timings"]["stages"]
    printed = capsys.readouterr().out
    assert "seed 4" in printed and "transformer" in printed


def test_generate_command_reports_bad_requests(fast_dir, tmp_path, capsys):
    assert generate([str(fast_dir), "--prompt", "a cat", "--width", "1000", "--height", "1000", "--any-size",
                     "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "not a multiple of 16" in err and not (tmp_path / "x.png").exists()
    assert generate([str(tmp_path / "nowhere"), "--prompt", "a cat", "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert generate([str(fast_dir), "--prompt", "a cat", "--quiet", "-o", str(tmp_path / "x.unknown")]) == 2
    assert "unknown image format" in capsys.readouterr().err
