"""Serving: batched generation, the wire protocol, the Triton model repository, and real Triton servers.

The oracle for every served image is `hidream-export generate` with the same arguments (its PNG file,
byte for byte), run in this process through the CLI's own entry point. Servers listen on 127.0.0.1 on
free ports; every wait has a deadline and every request a timeout. The engine folders are the
session's tiny Full and Dev builds (tests/conftest.py `built`), with a few steps per image.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http

from hidream_export.cli import main as cli_main
from hidream_export.errors import ManifestError, RequestError
from hidream_export.manifest import Manifest
from hidream_export.runtime import Pipeline
from hidream_export.runtime.pipeline import GenerationRequest
from hidream_export.serve import batching, protocol
from hidream_export.serve.batching import LoadedModel, batch_invariance, plan_runs, serve_batch
from hidream_export.serve.client import connect, request_image
from hidream_export.serve.repository import ModelSettings, RepositoryOptions, write_repository
from hidream_export.serve.server import libs_dir, prepare_server, stub_environment, tritonserver_dist
from hidream_export.testing.serving import LocalServer, free_ports, local_server, metric_values, wait_ready

SIZE = 256  # square, inside the tiny builds' range; HiDream's size rule keeps it
REQUEST_S = 120.0  # per request: generous for a loaded 2-core machine, still bounded


@pytest.fixture(scope="module")
def dev(built):
    return Pipeline.from_dir(built.folder("dev"), threads=2, progress=False)


@pytest.fixture(scope="module")
def full(built):
    return Pipeline.from_dir(built.folder("full"), threads=2, progress=False)


def generate_png(folder: Path, tmp_path: Path, prompt: str, seed: int, steps: int, **extra) -> bytes:
    """The PNG `hidream-export generate` writes for these arguments."""
    out = tmp_path / f"generate-{seed}-{abs(hash((prompt, steps, tuple(extra.items()))))}.png"
    argv = ["generate", str(folder), "--prompt", prompt, "--seed", str(seed), "--steps", str(steps), "--width",
            str(SIZE), "--height", str(SIZE), "--quiet", "-o", str(out)]
    for flag, value in extra.items():
        argv += [f"--{flag.replace('_', '-')}", str(value)]
    assert cli_main(argv) == 0
    return out.read_bytes()


# --- batched generation in the runtime ------------------------------------------------------------------

def test_a_batch_gives_each_request_its_unbatched_image(dev, full):
    """Different prompts, seeds, step counts and guidance in one batch: every image is bit-identical to
    its own call, and the batch really shares transformer calls."""
    cases = {dev: [GenerationRequest("a cat", seed=1, width=SIZE, height=SIZE, steps=3),
                   GenerationRequest("a dog on a hill", seed=2, width=SIZE, height=SIZE, steps=2),
                   GenerationRequest("a red fox", seed=3, width=SIZE, height=SIZE, steps=3, guidance_scale=2.0,
                                     negative_prompt="blurry", allow_cfg=True)],
             full: [GenerationRequest("a cat", seed=1, width=SIZE, height=SIZE, steps=2),
                    GenerationRequest("a cat", seed=2, width=SIZE, height=SIZE, steps=3, guidance_scale=0.0),
                    GenerationRequest("", seed=3, width=SIZE, height=SIZE, steps=2, guidance_scale=3.5)]}
    for pipe, requests in cases.items():
        alone = [pipe(r.prompt, r.negative_prompt, r.width, r.height, r.steps, r.guidance_scale, r.seed,
                      allow_cfg=r.allow_cfg) for r in requests]
        calls = []
        session = pipe.sessions["transformer"]
        original, bound = session.run, session.run_bound
        session.run = lambda feeds: calls.append(len(feeds["timesteps"])) or original(feeds)
        session.run_bound = lambda feeds, device: calls.append(feeds["timesteps"].shape[0]) or bound(feeds, device)
        try:
            together = pipe.generate_batch(requests)
        finally:
            session.run, session.run_bound = original, bound
        assert [np.array_equal(a.array, b.array) for a, b in zip(alone, together)] == [True] * len(requests)
        assert [r.seed for r in together] == [1, 2, 3]
        assert len(calls) == max(r.steps for r in requests) and max(calls) > 2  # shared calls, several rows
        assert not np.array_equal(together[0].array, together[1].array)  # the comparison can fail


def test_a_batch_refuses_mixed_sizes_and_too_many_rows(dev, full):
    with pytest.raises(RequestError, match=r"requests\[1\] resolves to 128x128, requests\[0\] to 256x256"):
        dev.generate_batch([GenerationRequest("a", width=SIZE, height=SIZE, any_size=True),
                            GenerationRequest("b", width=128, height=128, any_size=True)])
    with pytest.raises(RequestError, match=r"5 images need 10 transformer rows; .* batches of 2..8"):
        full.generate_batch([GenerationRequest("a", width=SIZE, height=SIZE)] * 5)
    with pytest.raises(RequestError, match=r"requests\[2\]: seed must be a non-negative integer"):
        dev.generate_batch([GenerationRequest("a"), GenerationRequest("b"), GenerationRequest("c", seed=-4)])


def test_resolved_requests_carry_everything_that_makes_the_image(dev):
    resolved = dev.resolve_request(GenerationRequest("a cat", width=SIZE, height=SIZE))
    assert (resolved.width, resolved.height, resolved.steps, resolved.any_size) == (SIZE, SIZE, 28, True)
    assert resolved.guidance_scale == 0.0 and isinstance(resolved.seed, int)
    with pytest.raises(RequestError, match="width=1008 is outside the exported range"):  # after the size rule
        dev.resolve_request(GenerationRequest("a cat", width=4000, height=SIZE))


def test_batch_invariance_probe_finds_a_row_dependent_backend(dev):
    assert batch_invariance(dev) == []  # ONNX Runtime's CPU provider: bit-identical rows
    session = dev.sessions["transformer"]
    original = session.run

    def row_dependent(feeds):  # what a backend with batch-size-dependent kernels looks like
        out = original(feeds)
        return {k: v + np.float32(1e-6) * (len(feeds["timesteps"]) - 1) for k, v in out.items()}

    session.run = row_dependent
    try:
        assert batch_invariance(dev) == ["transformer"]
    finally:
        session.run = original


# --- the wire protocol and one execution ------------------------------------------------------------------

def fields(**values):
    """Request arrays as Triton hands them over: [1, 1] per input."""
    out = {}
    for t in protocol.INPUTS:
        if t.name in values:
            v = values[t.name]
            out[t.name] = np.array([[v.encode() if isinstance(v, str) else v]], dtype=protocol.numpy_dtype(t))
    return out


@pytest.mark.parametrize("values, match", [
    (dict(prompt=np.array([[b"a"], [b"b"]], dtype=object)), r"prompt: one value per request .* \[2, 1\]"),
    (dict(prompt=np.array([[b"\xff\xfe"]], dtype=object)), "prompt: not UTF-8 text"),
    (dict(prompt=np.array([[b"x" * 5000]], dtype=object)), "prompt: 5000 bytes, at most 4096"),
    (dict(prompt=np.array([[b"a"]], dtype=object), negative_prompt=np.array([[b"\xc3"]], dtype=object)),
     "negative_prompt: not UTF-8 text"),
    (dict(), "prompt: required input missing"),
])
def test_parse_request_names_the_field(values, match):
    with pytest.raises(RequestError, match=match):
        protocol.parse_request(values)


def test_parse_request_reads_every_input():
    request = protocol.parse_request(fields(prompt="ein Fuchs ü", negative_prompt="", seed=7, width=320, height=192,
                                            steps=5, guidance_scale=np.float32(2.5), any_size=True,
                                            allow_cfg=True))
    assert (request.prompt, request.negative_prompt, request.seed) == ("ein Fuchs ü", "", 7)
    assert (request.width, request.height, request.steps, request.guidance_scale, request.any_size,
            request.allow_cfg) == (320, 192, 5, 2.5, True, True)
    # One name each; the server's own inputs (LoRAs, switched between runs) are not the pipeline's request.
    assert {t.name for t in protocol.INPUTS} - set(protocol.SERVER_INPUTS) <= set(GenerationRequest.__dataclass_fields__)
    with pytest.raises(RequestError, match="return_latents, latents cannot be sent to a server"):
        request_image(None, GenerationRequest("a", return_latents=True, latents=np.zeros(1)))


def test_plan_runs_groups_by_size_within_the_batch_range(full):
    def req(w, g=None):
        return GenerationRequest("a", width=w, height=w, guidance_scale=g)

    requests = [req(256), req(128), req(256), req(256), req(256, 0.0), req(256), req(128)]
    # Full: CFG takes 2 rows of 8; the 0.0-guidance one takes 1.
    assert plan_runs(full, requests, batching=True) == [[0, 2, 3, 4], [1, 6], [5]]
    assert plan_runs(full, requests, batching=False) == [[k] for k in range(len(requests))]


def test_one_bad_request_fails_alone_in_an_execution(dev):
    model = LoadedModel(dev, batching=True, why="test")
    served = serve_batch(model, [fields(prompt="a", seed=1, width=SIZE, height=SIZE, steps=2),
                                 fields(prompt="b", seed=2, width=4000, height=SIZE, any_size=True, steps=2),
                                 fields(prompt="c", seed=3, width=SIZE, height=SIZE, steps=-1),
                                 fields(prompt="d", seed=4, width=SIZE, height=SIZE, steps=2)],
                         wanted=[["png", "seed"], ["png"], ["png"], ["image"]])
    ok, bad_size, bad_steps, ok2 = served.outcomes
    assert bad_size.client_error and "width=4000 is outside the exported range" in bad_size.error
    assert bad_steps.client_error and "steps must be an integer >= 1" in bad_steps.error
    assert served.runs == [2]  # the two good ones shared one run
    assert set(ok.outputs) == {"png", "seed"} and set(ok2.outputs) == {"image"}
    alone = dev("a", seed=1, width=SIZE, height=SIZE, steps=2)
    assert ok.outputs["png"][0, 0] == protocol.png_bytes(alone.image) and ok.outputs["seed"][0, 0] == 1
    assert ok2.outputs["image"].shape == (1, SIZE, SIZE, 3) and ok2.outputs["image"].dtype == np.uint8
    assert served.timings.count("transformer") == 2 and served.timings.count("parse") == 1


def test_requests_name_loras_from_the_servers_folder(built, tmp_path):
    """Requests with and without LoRAs in one execution: each LoRA set runs apart (switched once), every
    image equals a Pipeline loaded with that LoRA (the oracle for LoRA maths is tests/test_lora.py's
    diffusers + peft), and a path, an unknown file or a server without --lora-dir fails that request alone."""
    from hidream_export.serve.batching import load_model
    from hidream_export.testing.loras import STYLE_MODULES, random_factors, write_lora

    loras = tmp_path / "loras"
    loras.mkdir()
    write_lora(loras / "style.safetensors", random_factors("tiny", STYLE_MODULES, rank=4, seed=1))
    model = load_model(str(built.folder("dev")), threads=2, batching="on", lora_dir=loras)
    args = dict(width=SIZE, height=SIZE, steps=2)
    served = serve_batch(model, [fields(prompt="a", seed=1, **args),
                                 fields(prompt="b", seed=2, lora="style.safetensors:0.8", **args),
                                 fields(prompt="c", seed=3, **args),
                                 fields(prompt="d", seed=4, lora="style.safetensors:0.8", **args),
                                 fields(prompt="e", seed=5, lora="../style.safetensors", **args),
                                 fields(prompt="f", seed=6, lora="absent.safetensors", **args)])
    plain_a, styled_b, plain_c, styled_d, path, absent = served.outcomes
    assert path.client_error and "no path" in path.error
    assert absent.client_error and absent.error.startswith("lora: ") and "absent.safetensors" in absent.error
    assert served.runs == [2, 2, 1]  # plain, style, then the absent file's (refused before generating)
    assert model.pipe.loras.records and model.pipe.loras.records[0].scale == 0.8
    styled = Pipeline.from_dir(built.folder("dev"), threads=2, progress=False,
                               loras=[(loras / "style.safetensors", 0.8)])
    plain = Pipeline.from_dir(built.folder("dev"), threads=2, progress=False)
    for outcome, pipe, prompt, seed in ((plain_a, plain, "a", 1), (styled_b, styled, "b", 2),
                                        (plain_c, plain, "c", 3), (styled_d, styled, "d", 4)):
        want = pipe(prompt, seed=seed, **args)
        assert np.array_equal(outcome.outputs["image"][0], np.asarray(want.image)), prompt
    assert not np.array_equal(styled_b.outputs["image"], plain("b", seed=2, **args).image)  # the LoRA acts
    no_dir = LoadedModel(model.pipe, batching=True, why="test")
    (refused,) = serve_batch(no_dir, [fields(prompt="a", seed=1, lora="style.safetensors", **args)]).outcomes
    assert refused.client_error and "--lora-dir" in refused.error
    assert protocol.lora_list("a.safetensors, b.safetensors:0.5") == (("a.safetensors", 1.0), ("b.safetensors", 0.5))


# --- the model repository ----------------------------------------------------------------------------------

def test_repository_layout_and_settings_round_trip(built, tmp_path):
    settings = ModelSettings("", providers=("CPUExecutionProvider",), threads=2, verify=False, batching="off")
    models = write_repository(RepositoryOptions((built.folder("full"), built.folder("dev")), tmp_path / "repo",
                                                names=("hidream-full", "hidream-dev"), settings=settings,
                                                instances=2, gpus=(0, 1), max_queue_delay_ms=2.5))
    assert [(m.name, m.max_batch_size) for m in models] == [("hidream-full", 4), ("hidream-dev", 4)]
    config = (tmp_path / "repo" / "hidream-full" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 4" in config
    assert "instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] } ]" in config
    assert "max_queue_delay_microseconds: 2500" in config
    for t in (*protocol.INPUTS, *protocol.OUTPUTS):
        assert f'name: "{t.name}" data_type: {t.config_type}' in config
    assert "TritonPythonModel" in (tmp_path / "repo" / "hidream-dev" / "1" / "model.py").read_text()
    # What the model reads back is what was written (Triton hands parameters over as string_value maps).
    params = {k: {"string_value": v} for k, v in re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}',
                                                          config)}
    back = ModelSettings.from_parameters(params, tmp_path / "repo" / "hidream-full")
    assert back == ModelSettings(str(built.folder("full").resolve()), providers=("CPUExecutionProvider",),
                                 threads=2, verify=False, batching="off")
    with pytest.raises(ManifestError, match=r"unknown parameters \['colour'\]"):
        ModelSettings.from_parameters({**params, "colour": {"string_value": "red"}}, "m")


def test_repository_refuses_what_it_cannot_write(built, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(RequestError, match="exists and is not empty; pass --force"):
        write_repository(RepositoryOptions((built.folder("dev"),), tmp_path / "taken"))
    assert (tmp_path / "taken" / "x").read_text() == "keep"
    with pytest.raises(RequestError, match="both serve as model 'dev'"):
        write_repository(RepositoryOptions((built.folder("dev"), built.folder("dev")), tmp_path / "r"))
    with pytest.raises(RequestError, match="--name given 1 time"):
        write_repository(RepositoryOptions((built.folder("dev"), built.folder("full")), tmp_path / "r", names=("a",)))
    with pytest.raises(ManifestError, match="no manifest.json"):
        write_repository(RepositoryOptions((tmp_path,), tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_copied_repository_holds_exactly_the_manifest_files(built, tmp_path):
    folder = built.folder("dev")
    (folder / "notes.txt").write_text("not part of the engine")
    try:
        write_repository(RepositoryOptions((folder,), tmp_path / "repo", copy=True, kind="cpu"))
    finally:
        (folder / "notes.txt").unlink()
    copy = tmp_path / "repo" / "dev" / "engine"
    manifest = Manifest.read(copy)
    manifest.verify(copy, manifest.components)  # every file, with its hash
    listed = {rel for c in manifest.components.values() for rel in c.files} | {"manifest.json"}
    assert {str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()} == listed


# --- servers -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    """Dev and Full on one server, one instance each, batching on (checked at load)."""
    from hidream_export.testing.loras import STYLE_MODULES, random_factors, write_lora

    root = tmp_path_factory.mktemp("serve")
    (root / "loras").mkdir()
    write_lora(root / "loras" / "style.safetensors", random_factors("tiny", STYLE_MODULES, rank=4, seed=1))
    with local_server([built.folder("dev"), built.folder("full")], ["--threads", "2", "--max-queue-delay-ms", "50",
                      "--exit-timeout", "30", "--lora-dir", str(root / "loras")], log=root / "serve.log") as s:
        yield s  # its LoRA folder: beside its log


def infer(server: LocalServer, model: str | None, request: GenerationRequest):
    """One request on its own connection, closed after (a stopping server waits for open connections)."""
    try:
        with connect(server.http, REQUEST_S) as client:
            return request_image(client, request, model, REQUEST_S)
    except Exception as exc:  # noqa: BLE001 - collected and checked by the caller
        return exc


@pytest.mark.slow
def test_concurrent_clients_get_generate_bytes_and_a_bad_request_fails_alone(server, built, tmp_path):
    """8 clients at once with different seeds (and one malformed request among them): each gets the PNG
    `generate` writes for its arguments; the malformed one gets an error naming its field."""
    steps = 3
    requests = {k: GenerationRequest(f"prompt {k}", seed=100 + k, width=SIZE, height=SIZE, steps=steps) for k in range(8)}
    requests["bad"] = GenerationRequest("bad", seed=1, width=SIZE, height=SIZE, steps=0)
    before = metric_values(server.metrics, "nv_inference_exec_count").get('{model="dev",version="1"}', 0.0)
    answers: dict = {}
    threads = [threading.Thread(target=lambda k=k: answers.__setitem__(k, infer(server, "dev", requests[k])))
               for k in [0, 1, 2, 3, "bad", 4, 5, 6, 7]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * REQUEST_S)
    assert not any(t.is_alive() for t in threads)
    assert isinstance(answers["bad"], RequestError) and "steps must be an integer >= 1, got 0" in str(answers["bad"])
    for k in range(8):
        assert not isinstance(answers[k], Exception), answers[k]
        assert answers[k].seed == 100 + k
        assert answers[k].png == generate_png(built.folder("dev"), tmp_path, f"prompt {k}", 100 + k, steps), k
    executions = metric_values(server.metrics, "nv_inference_exec_count")['{model="dev",version="1"}'] - before
    assert executions < 9  # Triton batched some of the 9 requests into shared executions
    images = metric_values(server.metrics, "hidream_run_images_sum")['{model="dev"}']
    runs = metric_values(server.metrics, "hidream_run_images_count")['{model="dev"}']
    assert images > runs  # and some transformer batches held several images


@pytest.mark.slow
def test_server_health_metrics_and_malformed_requests(server, built, tmp_path):
    with urllib.request.urlopen(f"{server.http}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    full = infer(server, "full", GenerationRequest("a cat", seed=5, width=SIZE, height=SIZE, steps=2))
    assert full.png == generate_png(built.folder("full"), tmp_path, "a cat", 5, 2)
    stages = metric_values(server.metrics, "hidream_stage_seconds_count")
    for stage in ("parse", "encode_t5", "transformer", "scheduler", "vae", "respond"):
        assert stages.get(f'{{model="full",stage="{stage}"}}', 0) >= 1, stage
    assert metric_values(server.metrics, "hidream_requests_total")['{model="full",outcome="ok"}'] >= 1

    # The wrong datatype (Triton refuses it) and a missing prompt (Triton passes it on here) are refused
    # naming the input, with 400.
    client = triton_http.InferenceServerClient(server.http.removeprefix("http://"), network_timeout=REQUEST_S)
    seed = triton_http.InferInput("seed", [1, 1], "FP32")
    seed.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
    prompt = triton_http.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a"]], dtype=object))
    good_seed = triton_http.InferInput("seed", [1, 1], "INT64")
    good_seed.set_data_from_numpy(np.array([[1]], dtype=np.int64))
    try:
        for inputs, match in (([prompt, seed], "input 'seed' data-type is 'FP32', but model 'full' expects 'INT64'"),
                              ([good_seed], "prompt: required input missing")):
            with pytest.raises(Exception, match=match) as info:
                client.infer("full", inputs)
            assert "400" in str(info.value.status())
    finally:
        client.close()
    assert metric_values(server.metrics, "hidream_requests_total")['{model="full",outcome="failed"}'] == 0


@pytest.mark.slow
def test_client_command(server, built, tmp_path, capsys):
    out = tmp_path / "client.png"
    assert cli_main(["client", server.http, "--model", "dev", "--prompt", "a cat", "--seed", "3", "--steps", "2",
                     "--width", str(SIZE), "--height", str(SIZE), "-o", str(out)]) == 0
    assert out.read_bytes() == generate_png(built.folder("dev"), tmp_path, "a cat", 3, 2)
    assert "model dev, seed 3" in capsys.readouterr().out
    styled = tmp_path / "styled.png"  # a LoRA from the server's folder: generate's bytes with that file
    assert cli_main(["client", server.http, "--model", "dev", "--prompt", "a cat", "--seed", "3", "--steps", "2",
                     "--width", str(SIZE), "--height", str(SIZE), "--lora", "style.safetensors:0.8", "-o",
                     str(styled)]) == 0
    assert styled.read_bytes() == generate_png(built.folder("dev"), tmp_path, "a cat", 3, 2,
                                               lora=f"{server.log.parent / 'loras' / 'style.safetensors'}:0.8")
    assert styled.read_bytes() != out.read_bytes()
    assert cli_main(["client", server.grpc, "--prompt", "a cat", "-o", str(tmp_path / "y.png")]) == 2
    assert "serves ['dev', 'full']; name one with --model" in capsys.readouterr().err
    assert cli_main(["client", server.grpc, "--model", "dev", "--prompt", "a", "--width", "4000", "--height", "256",
                     "--any-size", "-o", str(tmp_path / "y.png")]) == 2
    assert "width=4000 is outside the exported range" in capsys.readouterr().err and not (tmp_path / "y.png").exists()


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(built, tmp_path):
    with local_server([built.folder("dev")], ["--threads", "2"], log=tmp_path / "serve.log") as server:
        answer: dict = {}
        thread = threading.Thread(target=lambda: answer.setdefault("r", infer(
            server, "dev", GenerationRequest("a long one", seed=9, width=SIZE, height=SIZE, steps=40))))
        thread.start()
        started = threading.Event()
        for _ in range(600):  # until the request is in the model (0.05 s apart, at most 30 s)
            if metric_values(server.metrics, "hidream_requests_in_flight").get('{model="dev"}', 0) >= 1 \
                    or "r" in answer:
                started.set()
                break
            started.wait(0.05)
        assert started.is_set() and "r" not in answer
        code = server.stop(timeout_s=REQUEST_S)
        thread.join(timeout=REQUEST_S)
        assert code == 0, server.log_tail()
        result = answer["r"]
        assert not isinstance(result, Exception), result
        assert result.png == generate_png(built.folder("dev"), tmp_path, "a long one", 9, 40)
        assert "stopped" in server.log_tail()


@pytest.mark.slow
def test_a_folder_that_fails_verification_is_never_ready(built, tmp_path):
    """The model verifies its folder before Triton calls it ready: a modified file stops the start,
    and the one-line error names the file."""
    import shutil

    folder = tmp_path / "dev"
    shutil.copytree(built.folder("dev"), folder)
    with open(folder / "tokenizers" / "clip_l" / "tokenizer.json", "a") as fh:
        fh.write(" ")
    http, grpc, metrics = free_ports(3)
    done = subprocess.run([sys.executable, "-m", "hidream_export.cli", "serve", str(folder), "--host", "127.0.0.1",
                           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr
    assert "could not load model 'dev'" in done.stderr and "tokenizer.json" in done.stderr
    assert "the manifest records" in done.stderr and "ready;" not in done.stdout


@pytest.mark.slow
def test_generated_repository_runs_on_the_bundled_tritonserver(built, tmp_path):
    """The repository as the official container would get it (engine copied in), on the plain
    tritonserver binary with its default settings but loopback ports."""
    write_repository(RepositoryOptions((built.folder("dev"),), tmp_path / "repo", kind="cpu", copy=True,
                                       names=("hidream",)))
    dist = tritonserver_dist()
    server_dir = prepare_server(dist, tmp_path)
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "tritonserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(server_dir / "bin" / "tritonserver"), f"--model-repository={tmp_path / 'repo'}",
             f"--backend-directory={server_dir / 'backends'}", "--http-address=127.0.0.1", f"--http-port={http}",
             "--grpc-address=127.0.0.1", f"--grpc-port={grpc}", "--metrics-address=127.0.0.1",
             f"--metrics-port={metrics}"],
            stdout=out, stderr=subprocess.STDOUT,
            env=stub_environment(os.environ, libs_dir(dist)))
    server = LocalServer(process, f"http://127.0.0.1:{http}", f"grpc://127.0.0.1:{grpc}",
                         f"http://127.0.0.1:{metrics}/metrics", log)
    try:
        wait_ready(server, 180)
        result = infer(server, None, GenerationRequest("a cat", seed=4, width=SIZE, height=SIZE, steps=2))
        assert not isinstance(result, Exception), result
        assert result.model == "hidream"
        assert result.png == generate_png(built.folder("dev"), tmp_path, "a cat", 4, 2)
    finally:
        assert server.stop(timeout_s=90) == 0, server.log_tail()
