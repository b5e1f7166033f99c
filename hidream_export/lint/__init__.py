"""Op-support lint: will TensorRT's ONNX parser accept this graph? (`hidream-export lint`)

    from hidream_export.lint import lint_onnx
    report = lint_onnx("engines/dev/transformer/model.onnx")
    print(report.format()); report.ok

table.py holds the transcribed support matrix, checks.py the per-op restriction checks, plugins.py the
plugins the build registers, graph.py what is known of each tensor, linter.py the walk, report.py the result.
"""

from hidream_export.lint.linter import lint_onnx
from hidream_export.lint.plugins import DEFAULT_PLUGINS, HIDREAM_MOE_PLUGIN, PluginSpec
from hidream_export.lint.report import ERROR, INFO, WARNING, Finding, LintReport
from hidream_export.lint.table import OpTable, load_op_table

__all__ = ["lint_onnx", "DEFAULT_PLUGINS", "HIDREAM_MOE_PLUGIN", "PluginSpec", "ERROR", "INFO", "WARNING", "Finding",
           "LintReport", "OpTable", "load_op_table"]
