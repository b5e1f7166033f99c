"""`hidream-export`: the command line. All argument parsing lives here; each subcommand turns its flags
into the Python API's typed options and prints the result.

Expected failures (`HiDreamExportError`: a bad flag, file, key, shape or request, a missing library or
extra) print one line and exit 2; Ctrl-C exits 130 with one line; anything else is a bug and keeps its
traceback. Library warnings and INFO logs are shown only with --verbose.

Imports are lazy per subcommand, so `generate` and `doctor` work on a runtime-only install (no torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path

from hidream_export.errors import HiDreamExportError, MissingDependency, one_line
from hidream_export.export.targets import TARGETS
from hidream_export.model.lowerings import EXPORT_LOWERINGS, describe_export_lowerings
from hidream_export.runtime.backends import PROVIDER_SHORTHANDS
from hidream_export.signature import EXPORT_DTYPES
from hidream_export.variants import VARIANTS, get_variant

# Which extra brings a module a command needs (for the one-line message on a runtime-only install).
_EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "onnx_ir": "export", "transformers": "export",
           "diffusers": "export", "safetensors": "export", "polygraphy": "export", "onnx_graphsurgeon": "export",
           "sentencepiece": "export", "triton": "kernels", "tensorrt": "gpu", "pytriton": "serve",
           "tritonclient": "serve", "modelopt": "quant"}


QUIET_LOGGERS = ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration", "torch._dynamo",
                 "torch.export", "onnxscript", "onnx_ir", "transformers", "diffusers", "polygraphy")


# ---- subcommands -----------------------------------------------------------------------------------------

def _cmd_info(args) -> int:
    from hidream_export.info import (checkpoint_info, engine_folder_info, format_engine_folder_info, format_info,
                                     format_lora_info, lora_info)
    from hidream_export.lora import looks_like_lora
    from hidream_export.manifest import MANIFEST_NAME

    if looks_like_lora(args.checkpoint) or Path(args.checkpoint).suffix in (".pt", ".pth", ".bin", ".ckpt"):
        info = lora_info(args.checkpoint, checkpoint=args.against, config=args.config)
        print(json.dumps(info, indent=2) if args.json else format_lora_info(info))
        return 0 if info.get("fits", True) else 1
    if args.against:
        raise HiDreamExportError(f"--checkpoint goes with a LoRA file; {args.checkpoint} is not one")
    if (Path(args.checkpoint) / MANIFEST_NAME).is_file():  # an engine folder: what its manifest records
        info = engine_folder_info(args.checkpoint)
        print(json.dumps(info, indent=2) if args.json else format_engine_folder_info(info))
        return 0
    info = checkpoint_info(args.checkpoint, config=args.config)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_export(args) -> int:
    from hidream_export.export.transformer import export_transformer

    result = export_transformer(
        args.checkpoint, args.variant, args.out, moe=args.moe, target=args.target, dtype=args.dtype, opset=args.opset,
        min_size=args.min_size, max_size=args.max_size, opt_size=args.opt_size, config=args.config,
        force=args.force, streaming=not args.no_streaming, loras=args.lora, dry_run=args.dry_run, quiet=args.quiet,
        **_quant_options(args))
    if result.plan is not None:
        print(result.plan.format())
        return 0
    c = result.component
    if result.reused:
        print(f"{result.out_dir / c.path} is up to date (same checkpoint and settings): reused")
        return 0
    r = c.size_range
    computed = sum(1 for v in c.initializer_map.values() if v.startswith("computed:"))
    print(f"wrote {result.out_dir / c.path} (+ external data): {len(c.initializer_map)} weights "
          f"({len(c.initializer_map) - computed} from the checkpoint, {computed} computed) and "
          f"{c.initializers - len(c.initializer_map)} small constants, moe={c.moe_lowering}, target={c.target}, "
          f"dtype={c.dtype}, opset={c.opset}, sizes {r.min[0]}x{r.min[1]}..{r.max[0]}x{r.max[1]}, batch "
          f"{c.batch_range[0]}..{c.batch_range[1]}, {c.extra.get('export_seconds')} s")
    if c.quant:
        print(f"quantized: {c.quant.describe()}")
    return 0


def _quant_options(args) -> dict:
    return {"quant": args.quant, "quant_block": args.quant_block, "calibration": args.calibration,
            "ort_accuracy_level": args.ort_accuracy_level}


def _cmd_calibrate(args) -> int:
    from hidream_export.quant.calibrate import CalibrationOptions, calibrate

    table = calibrate(CalibrationOptions(
        Path(args.checkpoint), args.variant, Path(args.prompts), Path(args.out), llama=Path(args.llama) if args.llama
        else None, size=args.size, steps=args.steps, seed=args.seed, device=args.device, dtype=args.dtype,
        progress=False if args.quiet else None))
    print(f"wrote {args.out}: input amax of {len(table.amax)} linear layers over {table.meta['prompts']} prompt(s) "
          f"x {table.meta['steps']} steps at {table.meta['size'][0]}x{table.meta['size'][1]} "
          f"(checkpoint sha256 {table.checkpoint_sha256[:12]}...)")
    return 0


def _providers(args) -> list[str] | None:
    """--providers, or the list a --provider shorthand stands for; None: the runtime's default."""
    shorthand = getattr(args, "provider", None)
    if shorthand and args.providers:
        raise HiDreamExportError(f"--provider {shorthand} and --providers {args.providers} both choose providers; "
                                 f"give one")
    if shorthand:
        return list(PROVIDER_SHORTHANDS[shorthand])
    return [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None


def _cmd_compare(args) -> int:
    from hidream_export.compare.parity import compare_onnx

    providers = _providers(args)
    timesteps = None
    if args.timesteps:
        try:
            timesteps = "recipe" if args.timesteps == ["recipe"] else [float(t) for t in args.timesteps]
        except ValueError:
            raise HiDreamExportError(f"--timesteps {' '.join(args.timesteps)}: expected numbers or 'recipe'") from None
    report = compare_onnx(args.checkpoint, args.model, sizes=args.sizes, batch=args.batch, seed=args.seed,
                          atol=args.atol, rtol=args.rtol, min_cosine=args.min_cosine, save_dir=args.save_dir,
                          config=args.config, providers=providers, timesteps=timesteps,
                          min_routing=args.min_routing)
    print(report.format())
    return 0 if report.passed else 1


def _trt_options(args):
    from hidream_export.build.plan import TrtBuildOptions

    refit = {"true": True, "false": False, "identical": "identical"}[args.refit]
    return TrtBuildOptions(
        trt_version=args.trt_version, compute_capability=args.compute_capability, static_sizes=args.static_sizes,
        refit=refit, weight_stripped=bool(refit) and not args.no_weight_stripped, opt_level=args.opt_level,
        workspace_gib=args.workspace_gib,
        timing_cache=None if str(args.timing_cache).lower() == "none" else args.timing_cache,
        plugin_impl=args.plugin_impl, components=tuple(args.engines) if args.engines else None,
        force=args.force_engines)


def _cmd_build(args) -> int:
    out = Path(args.out) if args.out else get_variant(args.variant).default_out_dir
    if args.dry_run:
        from hidream_export.build.trt import build_engines

        if not args.trt:
            raise HiDreamExportError("--dry-run goes with --trt (it prints the TensorRT engine build plan); for the "
                                     "ONNX export plan use `hidream-export export --dry-run`")
        result = build_engines(out, options=_trt_options(args), dry_run=True)
        print(json.dumps(result.plan.to_dict(), indent=2) if args.json else result.plan.format())
        return 0
    from hidream_export.build.pipeline import build_pipeline

    manifest = build_pipeline(
        args.checkpoint, args.variant, out, llama=args.llama, moe=args.moe, dtype=args.dtype,
        encoder_dtype=args.encoder_dtype, force=args.force, trt=args.trt, opset=args.opset, link=args.link,
        target=args.target, trt_options=_trt_options(args) if args.trt else None, loras=args.lora, quiet=args.quiet,
        quant_encoders=args.quant_encoders, **_quant_options(args))
    print(f"built {out}: " + ", ".join(sorted(manifest.components)))
    return 0


def _request(args):
    """The image the request flags ask for (generate and client)."""
    from hidream_export.runtime.pipeline import GenerationRequest

    return GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width,
                             height=args.height, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                             any_size=args.any_size, allow_cfg=args.allow_cfg)


def _generate_options(args):
    from hidream_export.runtime.generate import GenerateOptions

    return GenerateOptions(
        folder=Path(args.dir), request=_request(args), output=Path(args.output),
        scheduler_flavour=args.scheduler_flavour, backend=args.backend, providers=_providers(args),
        threads=args.threads, verify=not args.no_verify, progress=False if args.quiet else None,
        report_json=Path(args.json) if args.json else None, io_binding=False if args.no_io_binding else None,
        loras=args.lora)


def _print_generated(done, quiet: bool) -> None:
    """What changed from the request and the seed always reach the user (stderr): an image that cannot be
    made again, or a size that changed without a word, is worse than one more line."""
    result = done.result
    for note in result.info.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if quiet:
        print(f"seed {result.seed}", file=sys.stderr)
        return
    cfg = f", guidance {result.guidance_scale:g}" if result.info.get("cfg") else ""
    print(f"wrote {done.output}: {result.width}x{result.height}, {result.steps} steps{cfg}, seed {result.seed}, "
          f"{result.timings.total('total'):.2f} s ({result.info['backend']})")
    print(result.timings.table())


def _cmd_generate(args) -> int:
    from hidream_export.runtime.generate import generate_to_file

    _print_generated(generate_to_file(_generate_options(args)), args.quiet)
    return 0


def _cmd_demo(args) -> int:
    """The README's main job: tiny random checkpoint -> engine folder -> image, all local."""
    from hidream_export.build.pipeline import build_pipeline
    from hidream_export.runtime.generate import GenerateOptions, generate_to_file
    from hidream_export.runtime.pipeline import GenerationRequest
    from hidream_export.testing.model_folder import write_model_folder

    variant = get_variant(args.variant)
    ckpt = Path(args.checkpoints) / f"tiny-{variant.name}"
    if not (ckpt / "model_index.json").exists():
        write_model_folder(ckpt, variant.name, "tiny", seed=0)
        print(f"wrote the tiny random-weight checkpoint {ckpt}")
    out = Path(args.out) if args.out else variant.default_out_dir
    build_pipeline(ckpt, variant, out)
    print(f"built {out}")
    request = GenerationRequest(args.prompt, seed=args.seed, width=256, height=256, any_size=True)
    done = generate_to_file(GenerateOptions(out, request, Path(args.output)))
    _print_generated(done, quiet=False)
    return 0


def _cmd_doctor(args) -> int:
    from hidream_export.doctor import doctor, format_doctor

    report = doctor()
    print(json.dumps(report, indent=2) if args.json else format_doctor(report))
    return 0  # a missing library is information, not an error


LINT_NOT_TENSORRT = 3  # `lint` exit code for an ONNX Runtime graph (0: parses, 1: findings, 2: bad input)


def _cmd_lint(args) -> int:
    from hidream_export.errors import NotATensorRTGraph
    from hidream_export.lint import DEFAULT_PLUGINS, PluginSpec, lint_onnx

    plugins = [] if args.no_plugins else list(DEFAULT_PLUGINS)
    plugins += [PluginSpec.parse(p) for p in args.plugin]
    try:
        report = lint_onnx(args.model, plugins=plugins)
    except NotATensorRTGraph as exc:
        print(f"hidream-export lint: {one_line(exc)}", file=sys.stderr)
        return LINT_NOT_TENSORRT
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format(show_info=not args.no_info))
    return 0 if report.ok else 1


def _model_settings(args):
    from hidream_export.serve.repository import ModelSettings

    return ModelSettings(engine_dir="", backend=args.backend, providers=tuple(_providers(args) or ()),
                         threads=args.threads or 0, verify=not args.no_verify, batching=args.batching,
                         scheduler_flavour=args.scheduler_flavour, io_binding=not args.no_io_binding,
                         lora_dir=str(Path(args.lora_dir).resolve()) if args.lora_dir else "")


def _gpus(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise HiDreamExportError(f"--gpus {text!r} must be comma-separated GPU ids, e.g. 0,1") from None


def _cmd_serve(args) -> int:
    from hidream_export.serve.server import ServeOptions, serve

    options = ServeOptions(
        folders=tuple(Path(d) for d in args.dirs), names=tuple(args.name or ()), settings=_model_settings(args),
        instances=args.instances, kind=args.kind, gpus=_gpus(args.gpus), max_queue_delay_ms=args.max_queue_delay_ms,
        host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        exit_timeout_s=args.exit_timeout, log_verbose=args.log_verbose)

    def ready(info) -> None:
        names = ", ".join(f"{m.name} ({m.folder}, up to {m.max_batch_size} per batch, "
                          f"{m.folder_bytes / 2**20:.0f} MiB per instance)" for m in info.models)
        print(f"serving {names}\n  HTTP    {info.http}  (POST /v2/models/{info.models[0].name}/infer)\n"
              f"  gRPC    {info.grpc}\n  metrics {info.metrics}\nready; SIGTERM or Ctrl-C finishes the requests in "
              f"flight and stops", flush=True)

    serve(options, on_ready=ready)
    print("stopped", flush=True)
    return 0


def _cmd_triton_repo(args) -> int:
    from hidream_export.serve.repository import RepositoryOptions, write_repository

    models = write_repository(RepositoryOptions(
        folders=tuple(Path(d) for d in args.dirs), out=Path(args.out), names=tuple(args.name or ()),
        settings=_model_settings(args), instances=args.instances, kind=args.kind, gpus=_gpus(args.gpus),
        max_queue_delay_ms=args.max_queue_delay_ms, copy=args.copy, force=args.force))
    for m in models:
        print(f"wrote {Path(args.out) / m.name}: config.pbtxt, 1/model.py ({m.folder}"
              f"{' copied' if args.copy else ''}; up to {m.max_batch_size} requests per batch; each instance "
              f"loads {m.folder_bytes / 2**30:.2f} GiB of model files)")
    print(f"serve it: tritonserver --model-repository {Path(args.out).resolve()}")
    return 0


def _cmd_client(args) -> int:
    from hidream_export.serve.client import ClientOptions, client_to_file

    from hidream_export.serve.protocol import lora_list

    loras = lora_list(",".join(args.lora), "--lora") if args.lora else ()
    result = client_to_file(ClientOptions(args.url, _request(args), Path(args.output), model=args.model,
                                          timeout_s=args.timeout, loras=loras))
    print(f"wrote {result.output}: model {result.model}, seed {result.seed}, {result.seconds:.2f} s")
    return 0


# ---- the parser ----------------------------------------------------------------------------------------------

def _add_target_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, choices=tuple(TARGETS),
                   help="runtime the transformer graph is for (default: onnxruntime with --moe ort, else tensorrt). "
                        + "; ".join(f"{name}: {summary}" for name, summary in TARGETS.items()))


def _add_trt_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT engines (--trt)")
    g.add_argument("--trt-version", help="plan for this TensorRT version (default: the installed one; dry runs)")
    g.add_argument("--compute-capability", help="plan for this GPU, e.g. 9.0 or sm90 (default: this machine's)")
    g.add_argument("--static-sizes", action="store_true",
                   help="add static optimization profiles at the recommended sizes (CUDA graphs at runtime)")
    g.add_argument("--refit", default="true", choices=["true", "false", "identical"],
                   help="transformer refit mode: true (refit per variant), identical (REFIT_IDENTICAL), false")
    g.add_argument("--no-weight-stripped", action="store_true",
                   help="build full transformer engines per variant instead of one weight-stripped engine + refit")
    g.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5 (default 3)")
    g.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit (default: unlimited)")
    g.add_argument("--timing-cache", default="auto", help="timing cache path, 'auto' (shared store) or 'none'")
    g.add_argument("--plugin-impl", default="jit", choices=["jit", "aot"],
                   help="HiDreamMoE plugin implementation: jit (Triton via Python, fast) or aot (PTX in the engine)")
    g.add_argument("--engines", nargs="+", default=None, metavar="COMPONENT", help="only these components")
    g.add_argument("--force-engines", action="store_true", help="rebuild every engine whatever the plan says")


def _add_request_arguments(p: argparse.ArgumentParser) -> None:
    """One image's arguments (generate and client)."""
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (CFG only, i.e. guidance > 1; default \"\")")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the variant's recipe)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale; CFG runs when > 1 (default: the variant's recipe)")
    p.add_argument("--allow-cfg", action="store_true",
                   help="allow --guidance > 1 on a guidance-distilled variant (Dev, Fast): twice the work per step")
    p.add_argument("--width", type=int, default=None, help="image width in px (multiple of 16)")
    p.add_argument("--height", type=int, default=None, help="image height in px (multiple of 16)")
    p.add_argument("--any-size", action="store_true",
                   help="use --width/--height as given instead of HiDream's rescaling to the model's area")


def _add_runtime_arguments(p: argparse.ArgumentParser, providers: str) -> None:
    """How an engine folder is loaded and sampled (generate, and each served model)."""
    p.add_argument("--scheduler-flavour", choices=("diffusers", "official"), default="diffusers",
                   help="scheduler as the diffusers model folders configure it (default) or as the official "
                        "HiDream-I1 repository implements it")
    p.add_argument("--backend", default="ort", help="ort (onnxruntime, default) or trt (TensorRT engines)")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated onnxruntime execution providers (default: {providers})")
    p.add_argument("--provider", choices=tuple(PROVIDER_SHORTHANDS), default=None,
                   help="shorthand for --providers: cuda (CUDAExecutionProvider, then CPU) or cpu")
    p.add_argument("--no-io-binding", action="store_true",
                   help="on the CUDA provider, feed the transformer host arrays each step instead of keeping "
                        "latents, text embeddings and timesteps on the GPU (the CPU provider always feeds host arrays)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (per model instance)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of the folder's files (sizes are still checked)")


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="engine folder written by `hidream-export build`")
    _add_request_arguments(p)
    _add_runtime_arguments(p, "CUDA if present, else CPU")
    p.add_argument("--json", metavar="REPORT.json", default=None, help="write settings and timings as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar or timing table; only the seed line")
    p.add_argument("-o", "--output", required=True, help="image file to write (.png, .jpg, .webp, ...)")
    _add_lora_argument(p, "applied to the transformer at load time (the folder's files are not changed)")


def _lora_request(text: str):
    from hidream_export.lora import LoraRequest

    try:
        return LoraRequest.parse(text)
    except HiDreamExportError as exc:
        raise argparse.ArgumentTypeError(one_line(exc)) from None


def _add_lora_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--lora", action="append", default=[], type=_lora_request, metavar="FILE[:SCALE]",
                   help=f"a LoRA .safetensors file (diffusers/peft or diffusion_model.* layout) and its scale (default "
                        f"1.0), {what}; repeat to stack LoRAs")


def _add_quant_arguments(p: argparse.ArgumentParser) -> None:
    from hidream_export.quant.scheme import BLOCK_SIZES, ORT_ACCURACY_LEVELS, SCHEMES

    g = p.add_argument_group("quantization (transformer)")
    g.add_argument("--quant", choices=SCHEMES, default=None,
                   help="int8/int4: weight-only, block-wise symmetric; fp8: e4m3 Q/DQ (needs --calibration)")
    g.add_argument("--quant-block", type=int, choices=BLOCK_SIZES, default=None,
                   help="int8/int4 block along the input dimension (default 32 for int8, 64 for int4)")
    g.add_argument("--calibration", metavar="AMAX.json", default=None,
                   help="fp8 activation ranges written by `hidream-export calibrate` for this checkpoint")
    g.add_argument("--ort-accuracy-level", type=int, choices=ORT_ACCURACY_LEVELS, default=None,
                   help="int8/int4: MatMulNBits compute for ONNX Runtime (1 float32, 4 int8; default 1 for int8, "
                        "4 for int4)")


def _add_model_settings(p: argparse.ArgumentParser, kind: str) -> None:
    """How each served model runs: the arguments `serve` and `triton-repo` share."""
    p.add_argument("dirs", nargs="+", metavar="DIR", help="engine folders written by `hidream-export build`")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="model name, once per folder in order (default: each folder's variant)")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances (per GPU with --kind gpu); each loads the folder once (default 1)")
    p.add_argument("--kind", choices=("cpu", "gpu"), default=kind,
                   help=f"where instances run: gpu (one group on every GPU, or --gpus) or cpu (default {kind})")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids for --kind gpu (default: all)")
    p.add_argument("--max-queue-delay-ms", type=float, default=10.0,
                   help="how long Triton's dynamic batcher waits for more requests when a model is idle (default 10)")
    p.add_argument("--batching", choices=("auto", "on", "off"), default="auto",
                   help="share transformer batches between requests: auto (only where batched rows are "
                        "bit-identical to unbatched ones, checked at load; default), on, off")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="a folder of LoRA .safetensors files requests may name in their `lora` input (default: "
                        "requests take no LoRAs)")
    _add_runtime_arguments(p, "CUDA on GPU instances, else CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hidream-export", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show library warnings and INFO logs")
    sub = parser.add_subparsers(dest="command", required=True)
    variants = sorted(VARIANTS)

    p = sub.add_parser("info", parents=[common],
                       help="config, parameter counts and dtypes of a transformer checkpoint, what a LoRA adapts, or "
                            "an engine folder's components, dtypes and quantization")
    p.add_argument("checkpoint", help="model folder, transformer/ folder or single .safetensors file; a LoRA file; or "
                                      "an engine folder")
    p.add_argument("--config", help="preset name or config.json (single-file checkpoints; for a LoRA: check it fits)")
    p.add_argument("--checkpoint", dest="against", metavar="MODEL",
                   help="for a LoRA: check that it fits this checkpoint (model folder, transformer/ or single file)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export", parents=[common], help="export the transformer to ONNX (weights as external data)")
    p.add_argument("checkpoint", help="model folder, transformer/ folder or single .safetensors file")
    p.add_argument("--variant", required=True, choices=variants)
    p.add_argument("--out", help="output folder (default engines/VARIANT)")
    p.add_argument("--moe", default="gather", choices=EXPORT_LOWERINGS,
                   help="MoE lowering (default gather). " + describe_export_lowerings())
    _add_target_argument(p)
    p.add_argument("--dtype", default="fp32", choices=EXPORT_DTYPES)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20; 23 for --target onnxruntime)")
    p.add_argument("--min-size", help="smallest WxH in pixels (default from the variant)")
    p.add_argument("--max-size", help="largest WxH in pixels")
    p.add_argument("--opt-size", help="WxH the TensorRT profile optimises for")
    p.add_argument("--config", help="preset or config.json (single-file checkpoints)")
    p.add_argument("--force", action="store_true",
                   help="replace an export of another checkpoint, variant or settings in --out")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be written (files, sizes, dtype, initializers); write nothing")
    p.add_argument("--no-streaming", action="store_true",
                   help="export a loaded model (holds all weights in memory) instead of streaming them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_quant_arguments(p)
    _add_lora_argument(p, "fused into the exported weights")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("calibrate", parents=[common],
                       help="FP8 activation ranges (amax.json) from the reference model over a prompt file")
    p.add_argument("checkpoint", help="a HiDream-I1 model folder (diffusers layout, with its text encoders)")
    p.add_argument("--variant", required=True, choices=variants)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="the calibration file to write (amax.json)")
    p.add_argument("--llama", help="Llama-3.1-8B-Instruct folder (default CHECKPOINT/llama)")
    p.add_argument("--size", default=None, help="WxH px of the trajectory (default: the model's default area)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the variant's recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device of the reference model (cpu, cuda)")
    p.add_argument("--dtype", default="fp32", choices=EXPORT_DTYPES, help="reference model dtype")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("compare", parents=[common], help="PyTorch reference vs ONNX Runtime on the same random inputs")
    p.add_argument("checkpoint")
    p.add_argument("model", help="the exported model.onnx (its folder's manifest.json is read)")
    p.add_argument("--sizes", nargs="+", help="WxH sizes (default: opt, min, max and a non-square size)")
    p.add_argument("--batch", type=int, default=None, help="transformer batch (default: one image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=None)
    p.add_argument("--rtol", type=float, default=None, help="relative to max|reference| (default by dtype)")
    p.add_argument("--min-cosine", type=float, default=None)
    p.add_argument("--timesteps", nargs="+", default=None, metavar="T",
                   help="timesteps to feed (one case per size and timestep), or 'recipe' for three of the variant's "
                        "sampling timesteps (default: random)")
    p.add_argument("--min-routing", type=float, default=None,
                   help="least share of routed tokens whose top-k experts match the reference (quantized default 0.99)")
    p.add_argument("--save-dir", default=None,
                   help="write inputs.json and reference_outputs.json (Polygraphy formats) into this folder")
    p.add_argument("--config", help="preset or config.json (single-file checkpoints)")
    p.add_argument("--providers", default=None,
                   help="comma-separated onnxruntime execution providers (default CPUExecutionProvider; bf16 "
                        "exports need CUDAExecutionProvider)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("build", parents=[common], help="export every component of a variant into one engine folder")
    p.add_argument("checkpoint", help="a HiDream-I1 model folder (diffusers layout)")
    p.add_argument("--variant", required=True, choices=variants)
    p.add_argument("--out", help="engine folder (default engines/VARIANT)")
    p.add_argument("--llama", help="Llama-3.1-8B-Instruct folder (default CHECKPOINT/llama)")
    p.add_argument("--moe", default="gather", choices=EXPORT_LOWERINGS, help="MoE lowering of the transformer")
    _add_target_argument(p)
    p.add_argument("--dtype", default="fp32", choices=EXPORT_DTYPES, help="transformer dtype")
    p.add_argument("--encoder-dtype", default="fp32", choices=EXPORT_DTYPES)
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset of every graph (default 20; the transformer 23 for --target onnxruntime)")
    p.add_argument("--link", default="auto", choices=["auto", "reflink", "hardlink", "copy"],
                   help="how variant folders get shared encoder/VAE files (auto: reflink, else copy)")
    p.add_argument("--trt", action="store_true", help="also build TensorRT engines (needs TensorRT)")
    p.add_argument("--dry-run", action="store_true", help="with --trt: print the engine build plan only")
    p.add_argument("--force", action="store_true", help="re-export everything")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    _add_quant_arguments(p)
    p.add_argument("--quant-encoders", choices=("int8", "int4"), default=None,
                   help="weight-only quantization of the T5 and Llama text encoders (their linear layers)")
    _add_lora_argument(p, "fused into the transformer's exported weights")
    _add_trt_arguments(p)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("doctor", parents=[common], help="what this machine can run and build (TensorRT, CUDA, GPU, ORT, Triton)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("generate", parents=[common], help="prompt -> image with the torch-free runtime")
    _add_generate_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("demo", parents=[common], help="tiny random checkpoint -> engine folder -> image (no download)")
    p.add_argument("--variant", default="fast", choices=variants)
    p.add_argument("--checkpoints", default="checkpoints", help="where the tiny checkpoint is written")
    p.add_argument("--out", help="engine folder (default engines/VARIANT)")
    p.add_argument("--prompt", default="a painting of a squirrel eating a burger")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", default="demo.png")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("serve", parents=[common],
                       help="serve engine folders on Triton Inference Server (KServe v2 HTTP/gRPC, metrics)")
    _add_model_settings(p, "cpu")
    p.add_argument("--host", default="0.0.0.0", help="address the endpoints listen on (default 0.0.0.0)")
    p.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--exit-timeout", type=int, default=60,
                   help="seconds requests in flight may take to finish after SIGTERM (default 60)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level (default 0)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("triton-repo", parents=[common],
                       help="write a Triton model repository (config.pbtxt + Python-backend model.py per folder)")
    _add_model_settings(p, "gpu")
    p.add_argument("--out", required=True, metavar="REPO", help="the repository folder to write")
    p.add_argument("--copy", action="store_true",
                   help="copy the engine folders into the repository (default: config.pbtxt names their paths)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_triton_repo)

    p = sub.add_parser("client", parents=[common], help="ask a served model for one image (tritonclient)")
    p.add_argument("url", metavar="URL", help="http://HOST:8000 or grpc://HOST:8001 (no scheme: http)")
    p.add_argument("--model", default=None, help="model name (default: the only one served)")
    _add_request_arguments(p)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the image (default 600)")
    p.add_argument("-o", "--output", required=True, help="image file to write (.png: the server's PNG as is)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                   help="a LoRA file in the server's --lora-dir (a name, no path) and its scale (default 1.0); "
                        "repeat to stack LoRAs")
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("lint", parents=[common],
                       help="check an ONNX model against TensorRT's published ONNX operator support (exit 0: "
                            "parses, 1: findings, 2: unreadable, 3: an ONNX Runtime graph)")
    p.add_argument("model", help="ONNX file to check (external weight files are not read)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--no-info", action="store_true", help="hide info lines in the text report")
    p.add_argument("--no-plugins", action="store_true",
                   help="assume no plugin is registered (HiDreamMoE nodes then need their local function)")
    p.add_argument("--plugin", action="append", default=[], metavar="NS::OP[:VERSION]",
                   help="an additional plugin the build registers (repeatable)")
    p.set_defaults(func=_cmd_lint)
    return parser


@contextlib.contextmanager
def _quiet_libraries(verbose: bool):
    """Only the tool's own output unless --verbose: library warnings (torchvision, LeafSpec, accelerate
    notices ...) and their INFO logs are dropped; hidream_export's own INFO lines stay."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        yield
        return
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    # Libraries that log warnings through their own handlers (torch.onnx's "torchvision is not installed"
    # per traced graph, onnxscript's constant-folding notes): raise their thresholds, without importing them.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    own = logging.getLogger("hidream_export")
    handler = logging.StreamHandler(sys.stderr)  # this command's stderr (main may run many times in one process)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = own.level, own.propagate
    own.setLevel(logging.INFO)
    own.propagate = False
    own.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from hidream_export.runtime.text import PromptTruncatedWarning

            warnings.simplefilter("always", PromptTruncatedWarning)  # the user's prompt was cut: always say so
            yield
    finally:
        own.removeHandler(handler)
        own.setLevel(saved[0])
        own.propagate = saved[1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"hidream-export {args.command}"
    try:
        with _quiet_libraries(args.verbose):
            return args.func(args)
    except HiDreamExportError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in _EXTRAS:
            raise
        error = MissingDependency(f"{top} is not installed; `{args.command}` needs the {_EXTRAS[top]} extra: "
                                  f"pip install \"hidream-export[{_EXTRAS[top]}]\"")
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; nothing more to say
        with contextlib.suppress(OSError):
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        return 0
    except OSError as exc:
        # Disk full, permissions, a folder where a file belongs ...: the environment, not a bug.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
