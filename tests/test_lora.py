"""LoRA on the transformer: every file layout, fused at build time and applied at load time, against the
oracle (diffusers' HiDreamImageTransformer2DModel with the LoRA loaded by diffusers + peft and weighted
with `set_adapters`), plus the refusals, the manifest record, `info` and the TensorRT refit name mapping.

Tolerance: fp32, max |ours - diffusers| <= 1e-4 * max |diffusers|, the export's own parity bound. The
oracle runs peft's unfused LoRA (W x + scaling * B(A x)); ours adds scaling * B @ A to W: the same sums in
another order (~1e-6 measured). A guard checks that each LoRA moves the output by far more than that.

diffusers 0.42 does not load the kohya-style `diffusion_model.*.lora_down/lora_up/alpha` layout for
HiDream (its key check wants "lora" in every key, and `.alpha` has none), so for that layout the oracle
loads the same factors and alphas written in the diffusers layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

from hidream_export.build.refit import refit_name_map
from hidream_export.cli import main as cli_main
from hidream_export.compare.parity import random_feed
from hidream_export.errors import CheckpointInputError, ExportError, RequestError
from hidream_export.export.transformer import export_transformer
from hidream_export.lora import LoraFile, LoraRequest, load_loras
from hidream_export.manifest import LoraRecord, Manifest, TrtEngineComponent
from hidream_export.model.moe import swiglu_fused_rows
from hidream_export.moe.ort_layout import fused_weight
from hidream_export.runtime import OrtBackend
from hidream_export.runtime.lora import FolderWeights, engine_refit_weights, resolve
from hidream_export.testing.loras import DETAIL_MODULES, LAYOUTS, STYLE_MODULES, random_factors, write_lora

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-4
GUARD = 1e-2  # a LoRA must move the output by at least this (relative), 100x the tolerance
SIZE = (256, 256)
# Per-module alphas (alpha/rank 2 or 0.5), so alphas, alpha_pattern and alpha tensors are all exercised.
STYLE_ALPHAS = {m: (8.0 if i % 3 else 2.0) for i, m in enumerate(STYLE_MODULES)}
DETAIL_ALPHAS = {m: (4.0 if i % 2 else 16.0) for i, m in enumerate(DETAIL_MODULES)}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """name -> file: "style" (rank 4) and "detail" (rank 8) in every layout, as "style-<layout>" etc."""
    root = tmp_path_factory.mktemp("loras")
    style = random_factors("tiny", STYLE_MODULES, rank=4, seed=1)
    detail = random_factors("tiny", DETAIL_MODULES, rank=8, seed=2)
    files = {}
    for layout in LAYOUTS:
        alphas = None if layout == "ai-toolkit" else (STYLE_ALPHAS, DETAIL_ALPHAS)
        files[f"style-{layout}"] = write_lora(root / f"style-{layout}.safetensors", style, layout,
                                              alphas and alphas[0])
        files[f"detail-{layout}"] = write_lora(root / f"detail-{layout}.safetensors", detail, layout,
                                               alphas and alphas[1])
    files["factors"] = {"style": style, "detail": detail}
    return files


def oracle_file(loras, name: str) -> tuple[Path, str]:
    """The file (and layout) diffusers loads for LoRA `name`: itself, or for the kohya-style layout the same
    factors and alphas in the diffusers layout."""
    kind, layout = name.split("-", 1)
    return (loras[f"{kind}-diffusers"], "diffusers") if layout == "non-diffusers" else (loras[name], layout)


def diffusers_transformer(checkpoint: Path, adapters: list[tuple[Path, str, float]]):
    """diffusers' transformer with LoRAs loaded as `load_lora_weights` does (`lora_state_dict`, which also
    converts the diffusion_model.* layout, then `load_lora_adapter`), or, for bare peft keys, as
    `load_lora_adapter(prefix=None)` does; weighted with `set_adapters`."""
    model = HiDreamImageTransformer2DModel.from_pretrained(checkpoint / "transformer").eval()
    names = []
    for i, (path, layout, _) in enumerate(adapters):
        names.append(f"adapter{i}")
        if layout == "peft":
            # use_safetensors=True: without it load_lora_adapter reads a file path through its generic
            # loader, which drops the header and with it the LoraConfig (alphas) the file carries.
            model.load_lora_adapter(str(path), prefix=None, adapter_name=names[-1], use_safetensors=True)
        else:
            state, metadata = HiDreamImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
            model.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name=names[-1])
    if names:
        model.set_adapters(names, weights=[s for _, _, s in adapters])
    return model


def diffusers_output(model, feed: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}, return_dict=False)[0].numpy()


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def run_export(folder: Path, initializers: dict | None = None) -> tuple[np.ndarray, dict]:
    """The exported transformer on a fixed random feed, with initializers replaced as the runtime does."""
    manifest = Manifest.read(folder)
    entry = manifest.transformer
    feed = random_feed(entry, *SIZE, batch=2, seed=3)
    session = OrtBackend(threads=2).load(manifest.file_path(folder, "transformer"), entry,
                                         **({"initializers": initializers} if initializers else {}))
    return session.run(feed)["sample"], feed


@pytest.fixture(scope="module")
def base(tiny_transformer_dir, tiny_export):
    """(folder, output without LoRA, feed) of the streaming `gather` export (Full)."""
    folder, _ = tiny_export("gather")
    out, feed = run_export(folder)
    return folder, out, feed


# ---- reading ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_as_the_same_modules(loras, layout):
    lora = LoraFile.read(loras[f"style-{layout}"])
    assert sorted(lora.modules) == sorted(f"{m}.weight" for m in STYLE_MODULES)
    assert lora.ranks == [4]
    for module, (down, up) in loras["factors"]["style"].items():
        got = lora.modules[f"{module}.weight"]
        np.testing.assert_array_equal(got.factors()[0], down.numpy())
        np.testing.assert_array_equal(got.factors()[1], up.numpy())
        alpha = 4.0 if layout == "ai-toolkit" else STYLE_ALPHAS[module]
        assert got.scaling == pytest.approx(alpha / 4)
    assert lora.layout == {"diffusers": "diffusers", "peft": "peft"}.get(layout, "non-diffusers")


def test_scale_parsing():
    assert LoraRequest.parse("a/style.safetensors:0.75") == LoraRequest(Path("a/style.safetensors"), 0.75)
    assert LoraRequest.parse("style.safetensors") == LoraRequest(Path("style.safetensors"), 1.0)
    assert LoraRequest.parse("c:/x.safetensors").scale == 1.0  # a colon that is not followed by a number
    with pytest.raises(CheckpointInputError, match="finite number"):
        LoraRequest.parse("style.safetensors:nan")


# ---- applied at load time ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_applied_at_load_matches_diffusers(loras, base, tiny_transformer_dir, layout, record_property):
    folder, plain, feed = base
    name, scale = f"style-{layout}", 0.8
    weights = FolderWeights.of(folder, Manifest.read(folder))
    lora_set = load_loras([(loras[name], scale)])
    weights.check(lora_set)
    ours, _ = run_export(folder, weights.overrides(lora_set))
    ref = diffusers_output(diffusers_transformer(tiny_transformer_dir, [(*oracle_file(loras, name), scale)]), feed)
    record_property("max_rel_err", rel(ours, ref))
    assert rel(ours, ref) <= RTOL
    assert rel(plain, ref) > GUARD  # the LoRA really changed the output


def test_stacked_at_load_matches_diffusers_multi_adapter(loras, base, tiny_transformer_dir):
    folder, plain, feed = base
    requests = [(loras["style-diffusers"], 0.8), (loras["detail-non-diffusers"], -0.6)]
    update = resolve(folder, Manifest.read(folder), requests)
    assert set(update.applied.replaced) == {f"{m}.weight" for m in STYLE_MODULES + DETAIL_MODULES}
    ours, _ = run_export(folder, update.initializers)
    ref = diffusers_output(diffusers_transformer(tiny_transformer_dir, [
        (*oracle_file(loras, "style-diffusers"), 0.8), (*oracle_file(loras, "detail-non-diffusers"), -0.6)]), feed)
    one = diffusers_output(diffusers_transformer(tiny_transformer_dir, [(*oracle_file(loras, "style-diffusers"), 0.8)]),
                           feed)
    assert rel(ours, ref) <= RTOL
    assert rel(one, ref) > GUARD and rel(plain, ref) > GUARD


@pytest.mark.parametrize("moe", ["dense", "plugin"])
def test_applied_at_load_on_other_lowerings(loras, tiny_export, tiny_transformer_dir, moe):
    """Streaming exports keep every weight under its checkpoint key whatever the lowering (the `plugin`
    graph stacks the per-expert initializers inside the graph)."""
    folder, _ = tiny_export(moe)
    update = resolve(folder, Manifest.read(folder), [(loras["detail-diffusers"], 1.3)])
    ours, feed = run_export(folder, update.initializers)
    ref = diffusers_output(diffusers_transformer(tiny_transformer_dir, [(loras["detail-diffusers"], "diffusers", 1.3)]),
                           feed)
    assert rel(ours, ref) <= RTOL


def test_runtime_lora_is_torch_free(loras, base):
    folder = base[0]
    code = (f"import sys\nfrom hidream_export.runtime.lora import resolve\nfrom hidream_export.manifest import Manifest\n"
            f"u = resolve({str(folder)!r}, Manifest.read({str(folder)!r}), [({str(loras['style-peft'])!r}, 0.5)])\n"
            f"assert len(u.initializers) == {len(STYLE_MODULES)}\n"
            f"print(sorted(m for m in ('torch', 'onnx', 'diffusers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- fused at build time ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fused(loras, tiny_transformer_dir, tmp_path_factory):
    """path -> (folder, ExportResult): the tiny checkpoint exported with style 0.8 + detail -0.6 fused, by the
    streaming path (gather) and the plain path (plugin: its exporter stacks the experts)."""
    requests = [(loras["style-diffusers"], 0.8), (loras["detail-non-diffusers"], -0.6)]
    out = {}
    for path, moe in (("streaming", "gather"), ("plain", "plugin")):
        folder = tmp_path_factory.mktemp(f"fused_{path}")
        out[path] = folder, export_transformer(tiny_transformer_dir, "full", folder, moe=moe, loras=requests,
                                               streaming=path == "streaming")
    return out


@pytest.mark.parametrize("path", ["streaming", "plain"])
def test_fused_at_build_matches_diffusers(fused, loras, base, tiny_transformer_dir, path):
    folder, result = fused[path]
    ours, feed = run_export(folder)
    ref = diffusers_output(diffusers_transformer(tiny_transformer_dir, [
        (*oracle_file(loras, "style-diffusers"), 0.8), (*oracle_file(loras, "detail-non-diffusers"), -0.6)]), feed)
    assert rel(ours, ref) <= RTOL
    assert rel(base[1], ref) > GUARD


def test_manifest_records_the_fused_loras_and_a_new_set_is_a_new_export(fused, loras, tiny_transformer_dir,
                                                                         tiny_export):
    folder, result = fused["streaming"]
    style, detail = LoraFile.read(loras["style-diffusers"]), LoraFile.read(loras["detail-non-diffusers"])
    entry = Manifest.read(folder).transformer
    assert entry.loras == [LoraRecord("style-diffusers.safetensors", style.sha256, 0.8),
                           LoraRecord("detail-non-diffusers.safetensors", detail.sha256, -0.6)]
    assert entry.extra["settings"]["loras"] == [{"sha256": style.sha256, "scale": 0.8},
                                                {"sha256": detail.sha256, "scale": -0.6}]
    assert "loras" not in tiny_export("gather")[1].component.extra["settings"]  # no LoRA: the key is unchanged
    again = export_transformer(tiny_transformer_dir, "full", folder, loras=[(loras["style-diffusers"], 0.8),
                                                                           (loras["detail-non-diffusers"], -0.6)])
    assert again.action == "reused"
    before = (folder / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match="other settings") as err:
        export_transformer(tiny_transformer_dir, "full", folder, loras=[(loras["style-diffusers"], 0.7)])
    assert "\n" not in str(err.value) and (folder / "manifest.json").read_bytes() == before


def test_a_plain_export_that_stacks_experts_refuses_load_time_loras(fused, loras):
    folder, _ = fused["plain"]
    with pytest.raises(RequestError, match=r"fuse the LoRA at build time") as err:
        resolve(folder, Manifest.read(folder), [(loras["style-diffusers"], 1.0)])
    assert "\n" not in str(err.value)


def test_an_export_that_rearranges_weights_refuses_load_time_loras(loras, base):
    """An export that stores some expert under an initializer the runtime cannot place (neither its checkpoint
    key nor an `ort` expert stack) cannot take a LoRA on it at load time: one line saying to fuse it at build
    time, not that the model lacks it."""
    folder = base[0]
    manifest = Manifest.read(folder)
    expert = f"{STYLE_MODULES[3]}.weight"
    manifest.transformer.initializer_map = {("interleaved_experts" if k == expert else k): v
                                            for k, v in manifest.transformer.initializer_map.items()}
    with pytest.raises(RequestError, match=r"1 LoRA module weight\(s\) .*experts.0.w1.*fuse the LoRA at build time"):
        resolve(folder, manifest, [(loras["style-diffusers"], 1.0)])
    resolve(folder, manifest, [(loras["detail-diffusers"], 1.0)])  # LoRAs on other weights still apply


# ---- the `ort` lowering: experts in interleaved fc1/fc2 stacks --------------------------------------------

# style + detail touch routed experts' w1, w2 and w3 (fc1's even rows, fc2, fc1's odd rows) besides attention,
# shared experts, the text feed-forward and adaLN.
STACKED = [("style-diffusers", 0.8), ("detail-non-diffusers", -0.6)]


def test_expert_rows_are_where_swiglu_fused_rows_puts_them():
    """ort_layout's map (checkpoint key -> rows of a stack) against the model's own fc1/fc2 construction."""
    E, I, D = 3, 5, 4
    w = {f"l.experts.{e}.{p}.weight": torch.randn(*((D, I) if p == "w2" else (I, D))) for e in range(E)
         for p in ("w1", "w2", "w3")}
    fc1 = swiglu_fused_rows(torch.stack([w[f"l.experts.{e}.w1.weight"] for e in range(E)]),
                            torch.stack([w[f"l.experts.{e}.w3.weight"] for e in range(E)])).numpy()
    fc2 = torch.stack([w[f"l.experts.{e}.w2.weight"] for e in range(E)]).numpy()
    stacks = {"l.experts.fc1_experts_weights": fc1, "l.experts.fc2_experts_weights": fc2}
    places = {**fused_weight("l.experts.fc1_experts_weights", E).rows(),
              **fused_weight("l.experts.fc2_experts_weights", E).rows()}
    assert sorted(places) == sorted(w)
    for key, at in places.items():
        np.testing.assert_array_equal(stacks[at.name][at.expert, at.part::at.parts], w[key].numpy())
    assert fused_weight("l.experts.0.w1.weight", E) is None


@pytest.fixture(scope="module")
def ort_oracle(loras, tiny_export, tiny_transformer_dir):
    """(base `ort` folder, its output without LoRA, feed, diffusers' output with the STACKED LoRAs)."""
    folder, _ = tiny_export("ort")
    plain, feed = run_export(folder)
    ref = diffusers_output(diffusers_transformer(
        tiny_transformer_dir, [(*oracle_file(loras, name), scale) for name, scale in STACKED]), feed)
    return folder, plain, feed, ref


def test_ort_experts_take_loras_at_load(loras, ort_oracle, record_property):
    folder, plain, feed, ref = ort_oracle
    update = resolve(folder, Manifest.read(folder), [(loras[name], scale) for name, scale in STACKED])
    stacks = {n for n in update.initializers if n.endswith("_experts_weights")}
    assert stacks == {"double_stream_blocks.0.block.ff_i.experts.fc1_experts_weights",
                      "double_stream_blocks.0.block.ff_i.experts.fc2_experts_weights",
                      "double_stream_blocks.1.block.ff_i.experts.fc2_experts_weights",
                      "single_stream_blocks.0.block.ff_i.experts.fc1_experts_weights",
                      "single_stream_blocks.1.block.ff_i.experts.fc1_experts_weights"}
    ours, _ = run_export(folder, update.initializers)
    record_property("max_rel_err", rel(ours, ref))
    assert rel(ours, ref) <= RTOL
    assert rel(plain, ref) > GUARD
    # Guard: without the experts' stacks the output misses the oracle by far more than the tolerance.
    rest, _ = run_export(folder, {n: v for n, v in update.initializers.items() if n not in stacks})
    assert rel(rest, ref) > 100 * RTOL


def test_ort_experts_take_loras_fused_at_build(loras, ort_oracle, tiny_transformer_dir, tmp_path):
    folder, plain, feed, ref = ort_oracle
    result = export_transformer(tiny_transformer_dir, "full", tmp_path, moe="ort",
                                loras=[(loras[name], scale) for name, scale in STACKED])
    assert result.component.moe_lowering == "ort" and len(result.component.loras) == 2
    ours, _ = run_export(tmp_path)
    assert rel(ours, ref) <= RTOL
    # Guard on the stacks themselves: a LoRA'd expert's rows changed, an untouched expert's did not.
    mine, theirs = (FolderWeights.of(f, Manifest.read(f)) for f in (tmp_path, folder))
    fc1 = "single_stream_blocks.1.block.ff_i.experts.fc1_experts_weights"
    new, old = mine.value(fc1), theirs.value(fc1)
    assert not np.array_equal(new[3, 1::2], old[3, 1::2])  # experts.3.w3: style
    np.testing.assert_array_equal(new[3, 0::2], old[3, 0::2])  # experts.3.w1: no LoRA
    np.testing.assert_array_equal(new[:3], old[:3])


# ---- refusals ---------------------------------------------------------------------------------------------

def _bad_files(root: Path, factors) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its one-line refusal says)."""
    module = STYLE_MODULES[0]
    down, up = factors[module]
    one = {module: (down, up)}
    out = {
        "dora": (write_lora(root / "dora.safetensors", one, "diffusers",
                            extra={f"transformer.{module}.lora_magnitude_vector": torch.ones(up.shape[0])}), "DoRA"),
        "lokr": (write_lora(root / "lokr.safetensors", one, "peft",
                            extra={f"{module}.lokr_w1": torch.ones(2, 2)}), "LoKr"),
        "absent": (write_lora(root / "absent.safetensors", {**one, **{
            f"double_stream_blocks.{i}.block.attn1.to_q": (down, up) for i in (7, 8, 9, 10)}}, "diffusers"),
            "4 LoRA modules are not layers of .*double_stream_blocks.10.block.attn1.to_q"),
        "rank": (write_lora(root / "rank.safetensors", {module: (down, torch.ones(up.shape[0], 8))}, "ai-toolkit"),
                 "rank mismatch"),
        "metadata rank": (write_lora(root / "meta.safetensors", one, "diffusers", metadata={
            "lora_adapter_metadata": json.dumps({"transformer.r": 16, "transformer.lora_alpha": 16})}),
            "gives r=16, its factors have rank 4"),
        "shape": (write_lora(root / "shape.safetensors", {module: (torch.ones(4, 48), up)}, "diffusers"),
                  r"shape mismatch .*LoRA \[32, 48\], weight \[32, 32\]"),
        "flux": (write_lora(root / "flux.safetensors", {"transformer_blocks.0.attn.to_q": (down, up)}, "diffusers",
                            ), "not a LoRA for this HiDream-I1 transformer.*Flux"),
        "nan": (write_lora(root / "nan.safetensors", {module: (down, up.clone().fill_(float("nan")))}, "diffusers"),
                "NaN or inf"),
        "inf": (write_lora(root / "inf.safetensors", {module: (down.clone().fill_(float("inf")), up)}, "peft"),
                "NaN or inf"),
        "text encoder": (write_lora(root / "te.safetensors", one, "diffusers",
                                    extra={"text_encoder.layer.lora_A.weight": down}), "text encoders"),
        "router": (write_lora(root / "router.safetensors", {"double_stream_blocks.0.block.ff_i.gate": (
            torch.ones(4, 32), torch.ones(4, 4))}, "diffusers"), "not linear layers"),
        "missing": (root / "nowhere.safetensors", "no such LoRA file"),
    }
    torch.save({f"transformer.{module}.lora_A.weight": down}, root / "pickled.safetensors")
    out["pickle"] = (root / "pickled.safetensors", "a pickle")
    return out


BAD = ["dora", "lokr", "absent", "rank", "metadata rank", "shape", "flux", "nan", "inf", "text encoder", "router",
       "missing", "pickle"]


@pytest.fixture(scope="module")
def bad_files(loras, tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad_loras"), loras["factors"]["style"])


@pytest.mark.parametrize("bad", BAD)
def test_bad_loras_are_refused_in_one_line_with_nothing_written(bad_files, base, tiny_transformer_dir, tmp_path,
                                                                capsys, bad):
    path, message = bad_files[bad]
    folder = base[0]
    with pytest.raises(CheckpointInputError, match=message) as err:  # at load time
        resolve(folder, Manifest.read(folder), [(path, 1.0)])
    assert "\n" not in str(err.value)
    out = tmp_path / "out"
    rc = cli_main(["export", str(tiny_transformer_dir), "--variant", "full", "--out", str(out), "--lora", str(path)])
    stderr = capsys.readouterr().err.strip()
    assert rc == 2 and len(stderr.splitlines()) == 1 and str(path.name) in stderr, stderr
    assert not out.exists()  # nothing written: refused before the output folder is made


def test_info_describes_a_lora_and_whether_it_fits(loras, tiny_transformer_dir, bad_files, capsys):
    assert cli_main(["info", str(loras["detail-non-diffusers"]), "--checkpoint", str(tiny_transformer_dir)]) == 0
    text = capsys.readouterr().out
    assert "non-diffusers (lora_down/lora_up)" in text and "rank         8" in text and "fits" in text
    assert "MoE experts: 2" in text and "MoE shared expert: 2" in text and "attention: 3" in text
    assert cli_main(["info", str(loras["style-diffusers"]), "--config", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fits"] and info["ranks"] == [4] and info["alpha"] == "metadata" and info["modules"] == 10
    assert sorted(info["scalings"]) == [0.5, 2.0]
    assert cli_main(["info", str(loras["style-diffusers"]), "--config", "small"]) == 1  # another model size
    assert "fits         config small: no: " in capsys.readouterr().out
    assert cli_main(["info", str(bad_files["pickle"][0])]) == 2


# ---- TensorRT: the refit through the build's name map -----------------------------------------------------

def test_refit_weights_go_through_the_engine_name_map(loras, base):
    """What TrtBackend refits for a LoRA, planned without TensorRT: the engine weight names come from the
    map `build.refit.refit_name_map` records for the engine; engines that cannot take it are refused."""
    folder = base[0]
    manifest = Manifest.read(folder)
    update = resolve(folder, manifest, [(loras["style-diffusers"], 0.5)])
    name_map = {k: f"engine::{k}" for k in refit_name_map(manifest.file_path(folder, "transformer"))}
    entry = TrtEngineComponent(path="transformer.plan", files={}, engine_for="transformer", flags={"refit": True},
                               refit={"name_map": name_map, "not_refittable": []})
    weights = engine_refit_weights(entry, update.initializers)
    assert sorted(weights) == sorted(f"engine::{m}.weight" for m in STYLE_MODULES)
    for name, value in update.initializers.items():
        assert weights[f"engine::{name}"].flags.c_contiguous and weights[f"engine::{name}"].dtype == np.float32
    folded = TrtEngineComponent(path="t.plan", files={}, flags={"refit": True},
                                refit={"name_map": name_map, "not_refittable": [next(iter(update.initializers))]})
    with pytest.raises(RequestError, match="no refittable weight .* fuse the LoRA at build time"):
        engine_refit_weights(folded, update.initializers)
    for mode in (False, "identical"):
        plain = TrtEngineComponent(path="t.plan", files={}, flags={"refit": mode}, refit=None)
        with pytest.raises(RequestError, match="not refittable"):
            engine_refit_weights(plain, update.initializers)


def test_trt_session_refit_sets_the_mapped_weights_and_drops_cuda_graphs(loras, base):
    """TrtSession.refit's calls into TensorRT, with a stand-in for the tensorrt module (no GPU here): one
    set_named_weights per mapped engine weight, with its dtype and element count, then one refit; CUDA
    graphs captured before are dropped (they would replay the old weights' pointers)."""
    from types import SimpleNamespace

    from hidream_export.runtime.trt_backend import TrtSession, _BufferSet

    folder = base[0]
    update = resolve(folder, Manifest.read(folder), [(loras["detail-peft"], 0.5)])
    calls, destroyed = [], []

    class Refitter:
        def __init__(self, engine, logger):
            calls.append(("refitter", engine))

        def set_named_weights(self, name, weights):
            calls.append((name, weights.dtype, weights.count))
            return True

        def get_missing_weights(self):
            return []

        def refit_cuda_engine(self):
            calls.append("refit")
            return True

    trt = SimpleNamespace(Refitter=Refitter, float32="FLOAT", float16="HALF", bfloat16="BF16",
                          Weights=lambda dtype, pointer, count: SimpleNamespace(dtype=dtype, count=count))
    session = object.__new__(TrtSession)  # no CUDA context: only the refit path is exercised
    session._trt, session.engine, session.path = trt, "engine", Path("transformer.plan")
    session._cudart = SimpleNamespace(cudaGraphExecDestroy=destroyed.append, cudaGraphDestroy=destroyed.append)
    session.entry = TrtEngineComponent(path="transformer.plan", files={}, flags={"refit": True},
                                       refit={"name_map": {n: f"w/{n}" for n in update.initializers}})
    captured = _BufferSet()
    captured.graph, captured.graph_exec, captured.warm = "graph", "exec", True
    session._buffers = {"shapes": captured}
    session.refit(update.initializers, logger=None)
    assert calls[0] == ("refitter", "engine") and calls[-1] == "refit"
    assert sorted(calls[1:-1]) == sorted((f"w/{n}", "FLOAT", v.size) for n, v in update.initializers.items())
    assert destroyed == ["exec", "graph"] and captured.graph_exec is None and not captured.warm


def test_build_refuses_a_bad_lora_before_writing_anything(tiny_models, bad_files, tmp_path, capsys):
    out = tmp_path / "engines" / "full"
    rc = cli_main(["build", str(tiny_models("full")), "--variant", "full", "--out", str(out),
                   "--lora", f"{bad_files['flux'][0]}:0.5"])
    stderr = capsys.readouterr().err.strip()
    assert rc == 2 and len(stderr.splitlines()) == 1 and "not a LoRA for this HiDream-I1 transformer" in stderr
    assert not (tmp_path / "engines").exists()
