#!/usr/bin/env python
"""How fast the torch-free runtime is, and what it costs around the models.

    python tools/bench_runtime.py [--preset small] [--size 512] [--steps 16] [--repeats 2] [--threads 2]
                                  [--workdir DIR] [--model DIR] [--engines DIR] [--skip-diffusers] [--json OUT]

Three measurements, printed as markdown tables:

1. ``import hidream_export.runtime``: wall time and resident memory in a fresh interpreter (median of
   several), against a bare interpreter. Target: under 0.5 s, and no torch.
2. Sampler overhead: what a denoising step spends outside the transformer call (CFG combination, casts,
   noise drawing, the numpy scheduler), as a fraction of the step, from the runtime's own Timings.
3. Seconds per image, end to end (text encoders, all steps, VAE), on onnxruntime CPU with the I/O-bound
   sampling loop (the default) and with host arrays, versus diffusers' ``HiDreamImagePipeline`` on the
   same weights, same latents and same per-step noise, with the same thread count, in this run; plus the
   largest pixel difference between the two as a sanity check.

The model is a random-weight ``write_model_folder(preset=...)`` folder (``small``: a few hundred million
parameters with the real text widths) built with ``hidream_export.build.pipeline.build_pipeline``;
``--model``/``--engines`` reuse folders from an earlier run (the build dominates a first run).
The recipe is the variant's (Fast: 16 steps, no CFG) at ``--size`` px, run with ``any_size`` so the size
is the one asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hidream_export.runtime.report import markdown_table, write_json  # noqa: E402  (torch-free)

PROMPT = "A cat holding a sign that says \"Hi-Dreams.ai\"."

IMPORT_CHILD = r"""
import json, resource, sys, time
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
base = rss()
t0 = time.perf_counter()
if sys.argv[1] == "runtime":
    import hidream_export.runtime
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "rss": rss(), "rss_base": base,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "torch": "torch" in sys.modules, "onnxruntime": "onnxruntime" in sys.modules}))
"""


def bench_import(repeats: int = 5) -> dict:
    """Median import time and resident memory of the runtime in fresh interpreters."""
    def run(what: str) -> dict:
        out = subprocess.run([sys.executable, "-c", IMPORT_CHILD, what], capture_output=True, text=True,
                             cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        return json.loads(out.stdout)

    run("runtime")  # warm the file cache and .pyc files
    bare = [run("bare") for _ in range(repeats)]
    runtime = [run("runtime") for _ in range(repeats)]
    return {
        "seconds": statistics.median(r["seconds"] for r in runtime),
        "rss_mib": statistics.median(r["rss"] for r in runtime) / 2**20,
        "bare_rss_mib": statistics.median(r["rss"] for r in bare) / 2**20,
        "imports_torch": any(r["torch"] for r in runtime),
        "imports_onnxruntime": any(r["onnxruntime"] for r in runtime),
        "repeats": repeats,
    }


def prepare(args) -> tuple[Path, Path, dict]:
    """The model folder and engine folder, written/built unless given; with how long each took."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_runtime_"))
    model = Path(args.model) if args.model else work / f"model_{args.variant}_{args.preset}"
    engines = Path(args.engines) if args.engines else work / "engines" / args.variant
    took = {}
    if not (model / "model_index.json").exists():
        from hidream_export.testing.model_folder import write_model_folder

        t0 = time.perf_counter()
        write_model_folder(model, args.variant, preset=args.preset, seed=0)
        took["write_model_folder_s"] = time.perf_counter() - t0
    if not (engines / "manifest.json").exists():
        from hidream_export.build.pipeline import build_pipeline
        from hidream_export.testing.model_folder import LLAMA_SUBDIR

        t0 = time.perf_counter()
        build_pipeline(model, args.variant, engines, llama=model / LLAMA_SUBDIR)
        took["build_s"] = time.perf_counter() - t0
    return model, engines, took


def make_inputs(args, channels: int, steps: int, needs_noise: bool):
    """Latents and per-step noise both sides get (numpy, float32)."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(0))
    lat = rng.standard_normal((1, channels, args.size // 8, args.size // 8), dtype=np.float32)
    noise = [rng.standard_normal(lat.shape, dtype=np.float32) for _ in range(steps)] if needs_noise else None
    return lat, noise


def bench_runtime(args, engines: Path, io_binding: bool) -> dict:
    from hidream_export.runtime import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_dir(engines, threads=args.threads, progress=False, io_binding=io_binding)
    load_s = time.perf_counter() - t0
    steps = args.steps or pipe.variant.steps
    sched = pipe.make_scheduler(steps)
    lat, noise = make_inputs(args, pipe.transformer_info.in_channels, steps, sched.needs_noise)
    guidance = pipe.variant.guidance_scale

    def once(n_steps=steps, n_noise=noise):
        return pipe(PROMPT, width=args.size, height=args.size, steps=n_steps, guidance_scale=guidance,
                    any_size=True, latents=lat, noise=n_noise)

    once(1, None if noise is None else noise[:1])  # warm-up: first-run allocations and kernel choices
    runs = [once() for _ in range(args.repeats)]
    per_image = [r.timings.total("total") for r in runs]
    best = runs[per_image.index(min(per_image))]
    t = best.timings
    return {
        "load_s": load_s, "steps": steps, "guidance": guidance, "seconds_per_image": min(per_image),
        "all_runs_s": per_image,
        "text_s": t.total("tokenize") + sum(t.total(s) for s in t.stages if s.startswith("encode_")),
        "transformer_mean_s": t.mean("transformer"), "step_mean_s": t.mean("step"),
        "overhead_mean_ms": 1e3 * (t.total("step") - t.total("transformer")) / t.count("step"),
        "scheduler_mean_ms": 1e3 * t.mean("scheduler"), "sampler_overhead": t.sampler_overhead(),
        "vae_s": t.total("vae"), "backend": best.info["backend"], "image": best.array, "timings": t.as_dict(),
        "latents": lat, "noise": noise,
    }


def bench_diffusers(args, model: Path, steps: int, guidance: float, lat, noise) -> dict:
    """diffusers' pipeline on the model folder, fp32, with the runtime's latents and noise."""
    import torch
    import diffusers.schedulers.scheduling_flow_match_lcm as lcm_module
    from diffusers import HiDreamImagePipeline
    from transformers import AutoTokenizer, LlamaForCausalLM

    from hidream_export.testing.model_folder import LLAMA_SUBDIR

    torch.set_num_threads(args.threads or os.cpu_count())
    t0 = time.perf_counter()
    tok4 = AutoTokenizer.from_pretrained(model / LLAMA_SUBDIR)
    enc4 = LlamaForCausalLM.from_pretrained(model / LLAMA_SUBDIR, output_hidden_states=True, output_attentions=True)
    pipe = HiDreamImagePipeline.from_pretrained(model, tokenizer_4=tok4, text_encoder_4=enc4, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    # diffusers rescales every request to (default_sample_size * 8)^2 px: make that the benchmark size.
    pipe.default_sample_size = args.size // 8
    load_s = time.perf_counter() - t0
    original_randn = lcm_module.randn_tensor

    def run(n_steps, n_noise):
        if n_noise is not None:
            draws = iter(n_noise)
            lcm_module.randn_tensor = lambda shape, generator=None, device=None, dtype=None, **_: \
                torch.from_numpy(next(draws).copy())
        try:
            start = time.perf_counter()
            with torch.no_grad():
                image = pipe(PROMPT, width=args.size, height=args.size, num_inference_steps=n_steps,
                             guidance_scale=guidance, output_type="np", latents=torch.from_numpy(lat.copy())).images[0]
            return time.perf_counter() - start, image
        finally:
            lcm_module.randn_tensor = original_randn

    run(1, None if noise is None else noise[:1])  # warm-up
    runs = [run(steps, noise) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r[0])
    return {"load_s": load_s, "seconds_per_image": best[0], "all_runs_s": [r[0] for r in runs], "image": best[1],
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="fast", choices=["full", "dev", "fast"])
    p.add_argument("--preset", default="small", help="transformer preset of the generated model (default small)")
    p.add_argument("--size", type=int, default=512, help="square image side in px (default 512)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the variant's recipe)")
    p.add_argument("--repeats", type=int, default=2, help="timed images per backend (best is reported)")
    p.add_argument("--threads", type=int, default=None, help="threads for onnxruntime and torch (default: all)")
    p.add_argument("--workdir", default=None, help="where to write the model and engine folders")
    p.add_argument("--model", default=None, help="existing model folder (skips write_model_folder)")
    p.add_argument("--engines", default=None, help="existing engine folder (skips the build)")
    p.add_argument("--skip-diffusers", action="store_true", help="only the runtime")
    p.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    import numpy as np

    report: dict = {"settings": {k: v for k, v in vars(args).items()}}
    imp = bench_import()
    report["import"] = imp
    print("## import hidream_export.runtime (fresh interpreter, median of %d)\n" % imp["repeats"])
    print(markdown_table(["seconds", "RSS MiB", "bare interpreter RSS MiB", "imports torch", "imports onnxruntime"],
                         [[f"{imp['seconds']:.3f}", f"{imp['rss_mib']:.1f}", f"{imp['bare_rss_mib']:.1f}",
                           imp["imports_torch"], imp["imports_onnxruntime"]]]))
    print(f"\ntarget < 0.5 s: {'met' if imp['seconds'] < 0.5 else 'MISSED'}\n", flush=True)

    model, engines, took = prepare(args)
    report["prepare"] = took
    if took:
        rows = [[k, f"{v:.1f}"] for k, v in took.items()]
        print("## preparation\n\n" + markdown_table(["step", "seconds"], rows) + "\n")

    # The I/O-bound loop (the default) and the host loop, one after the other on the same folder.
    host = bench_runtime(args, engines, io_binding=False)  # what the CPU provider runs by default
    rt = bench_runtime(args, engines, io_binding=True)
    ours_image = rt.pop("image")
    same = bool(np.array_equal(host.pop("image"), ours_image))
    lat, noise = rt.pop("latents"), rt.pop("noise")
    host.pop("latents"), host.pop("noise")
    report["runtime"], report["runtime_host_loop"] = rt, host
    report["io_binding_image_bit_identical"] = same
    print(f"## sampler overhead ({args.preset}, {args.size}x{args.size}, {args.variant}: {rt['steps']} steps, "
          f"{rt['backend']})\n")
    print(markdown_table(
        ["loop", "transformer ms/step", "rest of the step ms", "of which scheduler ms", "overhead % of step"],
        [[name, f"{1e3 * r['transformer_mean_s']:.1f}", f"{r['overhead_mean_ms']:.3f}", f"{r['scheduler_mean_ms']:.3f}",
          f"{100 * r['sampler_overhead']:.3f}%"] for name, r in (("I/O binding", rt), ("host arrays", host))]) + "\n")
    print(f"I/O-bound and host loops' images bit-identical: {same}\n", flush=True)

    rows = [["hidream_export.runtime (onnxruntime, I/O binding)", f"{rt['load_s']:.1f}",
             f"{rt['seconds_per_image']:.2f}", f"{rt['text_s']:.2f}", f"{rt['vae_s']:.2f}", ""],
            ["hidream_export.runtime (onnxruntime, host arrays)", f"{host['load_s']:.1f}",
             f"{host['seconds_per_image']:.2f}", f"{host['text_s']:.2f}", f"{host['vae_s']:.2f}",
             f"{host['seconds_per_image'] / rt['seconds_per_image']:.2f}x"]]
    if not args.skip_diffusers:
        ref = bench_diffusers(args, model, rt["steps"], rt["guidance"], lat, noise)
        diff = float(np.abs(ref.pop("image") - ours_image).max())
        report["diffusers"] = {**ref, "image_max_abs_diff": diff}
        rows.append([f"diffusers HiDreamImagePipeline (torch, {ref['torch_threads']} threads)", f"{ref['load_s']:.1f}",
                     f"{ref['seconds_per_image']:.2f}", "", "",
                     f"{ref['seconds_per_image'] / rt['seconds_per_image']:.2f}x"])
        rows[0][-1] = "1.00x"
        report["diffusers_vs_runtime_image_max_abs_diff"] = diff
    print(f"## seconds per image ({args.preset}, {args.size}x{args.size}, {args.variant}, {rt['steps']} steps, "
          f"best of {args.repeats})\n")
    print(markdown_table(["pipeline", "load s", "s / image", "text encoders s", "VAE s", "time vs runtime"], rows))
    if "diffusers" in report:
        print(f"\nmax |diffusers - runtime| on the [0, 1] image: {report['diffusers']['image_max_abs_diff']:.2e}")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
