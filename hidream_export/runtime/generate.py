"""Prompt -> image file with the torch-free runtime: what `hidream-export generate` (and `demo`) run.

`generate_to_file(GenerateOptions(...))` checks the output paths first (before any model loads), loads
the engine folder, generates, and writes the image (and the JSON report) atomically. cli.py parses the
arguments into a GenerateOptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hidream_export.errors import RequestError
from hidream_export.files import atomic_open
from hidream_export.runtime.pipeline import GenerationRequest

__all__ = ["GenerateOptions", "GenerateResult", "generate_to_file", "check_output", "image_format"]


@dataclass(frozen=True)
class GenerateOptions:
    folder: Path
    request: GenerationRequest
    output: Path
    scheduler_flavour: str = "diffusers"
    backend: str = "ort"
    providers: Sequence[str] | None = None
    threads: int | None = None
    verify: bool = True
    progress: bool | None = None  # None: a bar on a terminal
    report_json: Path | None = None
    io_binding: bool | None = None  # None: on for the ort backend (Pipeline.from_dir)
    loras: Sequence = ()  # LoRA files applied at load time: paths or (path, scale) pairs (--lora FILE[:SCALE])


@dataclass
class GenerateResult:
    result: object  # runtime.pipeline.GenerationResult
    output: Path
    report_json: Path | None
    load_timings: object  # runtime.report.Timings


def check_output(path: Path, flag: str = "-o") -> None:
    """Fail before generating when a file could not be written there (unknown image format, a folder,
    a parent that is a file or missing permissions)."""
    from PIL import Image

    if path.is_dir():
        raise RequestError(f"{flag} {path} is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RequestError(f"{flag} {path}: {probe} is not a folder")
    import os

    if not os.access(probe, os.W_OK | os.X_OK):
        raise RequestError(f"{flag} {path}: {probe} is not writable")
    if flag == "-o":
        Image.init()
        if path.suffix.lower() not in Image.EXTENSION:
            raise RequestError(f"-o {path}: unknown image format {path.suffix!r}; use .png, .jpg or .webp")


def generate_to_file(options: GenerateOptions) -> GenerateResult:
    """Load the folder, generate one image as `options` say, write it (and the report) to disk."""
    from .pipeline import Pipeline
    from .report import write_json

    output = Path(options.output)
    check_output(output, "-o")
    if options.report_json is not None:
        check_output(Path(options.report_json), "--json")
    pipe = Pipeline.from_dir(options.folder, backend=options.backend, providers=options.providers,
                             scheduler_flavour=options.scheduler_flavour, threads=options.threads,
                             verify=options.verify, progress=options.progress, loras=options.loras,
                             io_binding=options.io_binding)
    result = pipe.generate_batch([options.request])[0]
    # A fresh unpredictable temporary file beside the output, renamed over it; PIL picks the format by suffix.
    with atomic_open(output, "wb", suffix=output.suffix) as fh:
        result.image.save(fh, format=image_format(output))
    if options.report_json is not None:
        report = result.report()
        report["output"] = str(output)
        report["folder"] = str(options.folder)
        report["load_timings"] = pipe.load_timings.as_dict()
        write_json(options.report_json, report)
    return GenerateResult(result, output, options.report_json, pipe.load_timings)


def image_format(path: Path) -> str:
    """PIL's format name for an image file's suffix (check_output has refused unknown ones)."""
    from PIL import Image

    Image.init()
    return Image.EXTENSION[path.suffix.lower()]
