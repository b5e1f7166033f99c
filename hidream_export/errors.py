"""The one root of every expected failure, and one subclass per stage. Torch-free.

An expected failure is one the user can act on: a bad flag, file, key, shape, request or a missing
library. Its message is a single line naming what is wrong and what was expected; the CLI prints it
without a traceback. Anything that is not a `HiDreamExportError` is a bug and keeps its traceback.

Each class also derives from the builtin a caller would have caught before it existed (ValueError for
bad input, ImportError for a missing library, RuntimeError for a failed build), so `except ValueError`
keeps working.

The reference model (`hidream_export.model`) imports nothing of the toolchain, so its own errors
(`CheckpointError`, `ConfigError`) are plain ValueErrors; the toolchain functions that call it turn them
into `CheckpointInputError` (see `hidream_export.export.common.model_errors`).
"""

from __future__ import annotations


class HiDreamExportError(Exception):
    """An expected failure: the message says what is wrong and what was expected, in one line."""


class CheckpointInputError(HiDreamExportError, ValueError):
    """A checkpoint, config or LoRA file that cannot be used as it is."""


class ExportError(HiDreamExportError, ValueError):
    """An export that cannot proceed; the message names the file, flag or value at fault."""


class ManifestError(HiDreamExportError, ValueError):
    """A folder whose manifest is missing, unreadable, from a newer format, or does not match its files."""


class MoEContractError(HiDreamExportError, ValueError):
    """Inputs or attributes that break the HiDreamMoE op contract (hidream_export.moe.schema)."""


class LintInputError(HiDreamExportError, ValueError):
    """A file the lint cannot read as an ONNX model."""


class NotATensorRTGraph(LintInputError):
    """An ONNX graph made for another runtime (ONNX Runtime's contrib ops): there is nothing to lint."""


class CompareError(HiDreamExportError, ValueError):
    """A parity check that cannot run (wrong model, size or provider)."""


class RequestError(HiDreamExportError, ValueError, TypeError):
    """A generation request the loaded engine folder cannot serve (size, steps, prompt, seed ...): a bad
    value or a value of the wrong type (hence both builtins)."""


class BuildPlanError(HiDreamExportError, ValueError):
    """The manifest or the options do not allow a TensorRT build plan."""


class BuildError(HiDreamExportError, RuntimeError):
    """An engine build, refit or link that failed; the message names the engine and the cause."""


class EngineMismatch(HiDreamExportError, RuntimeError):
    """A TensorRT engine built for another GPU, TensorRT version or profile than this run needs."""


class MissingPluginError(HiDreamExportError, RuntimeError):
    """A plugin a graph or engine needs is not registered with TensorRT (and could not be)."""


class OutputExists(HiDreamExportError, FileExistsError):
    """An output path holds something hidream-export did not write and will not replace."""


class ServeError(HiDreamExportError, RuntimeError):
    """A server that would not start or stopped by itself, or a server that answered a client with an
    error; the message names the server, model or request field."""


class FolderLocked(HiDreamExportError, RuntimeError):
    """Another hidream-export run is writing the same output folder."""


class MissingDependency(HiDreamExportError, ImportError):
    """A library this step needs is not installed; the message names the extra that installs it."""


class BackendUnavailable(MissingDependency):
    """A runtime backend that cannot run here (its library is not installed, or no device for it)."""


class TensorRTUnavailable(MissingDependency):
    """TensorRT cannot be imported here. The message says what needs it and how to get it."""


class PluginRegistrationError(MissingDependency):
    """The HiDreamMoE TensorRT plugin cannot be registered (no tensorrt.plugin, or no AOT support)."""


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (newlines and runs of spaces folded)."""
    return " ".join(str(exc).split())
