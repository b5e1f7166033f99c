"""What the lint reports: findings by severity (error = the parser or builder is documented to reject
it; warning = documented to be fragile, or not listed; info = what the build must provide, or what was not
checked), and the report over one model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

ERROR = "error"
WARNING = "warning"
INFO = "info"
SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}

# --------------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Finding:
    """One thing the lint has to say about one node (or tensor)."""

    severity: str
    op_type: str
    node: str
    message: str
    where: str = "graph"

    def to_dict(self) -> dict:
        return {"severity": self.severity, "op_type": self.op_type, "node": self.node, "where": self.where,
                "message": self.message}

    def format(self) -> str:
        place = f" [{self.where}]" if self.where != "graph" else ""
        return f"{self.severity.upper():7s} {self.op_type} '{self.node}'{place}: {self.message}"


@dataclass
class LintReport:
    """Findings for the graph TensorRT will parse, plus (separately) function bodies a plugin replaces.

    `op_counts` counts the nodes the parser will see, per op type (`domain::op_type` outside the default
    domain), including If/Loop bodies and inlined model-local functions (once per call)."""

    model: str
    tensorrt_version: str
    source: Mapping
    findings: list[Finding] = field(default_factory=list)
    shadowed: list[Finding] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    shadowed_op_counts: dict[str, int] = field(default_factory=dict)

    def _of(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self._of(ERROR)

    @property
    def warnings(self) -> list[Finding]:
        return self._of(WARNING)

    @property
    def infos(self) -> list[Finding]:
        return self._of(INFO)

    @property
    def ok(self) -> bool:
        """No errors in what TensorRT parses (warnings and shadowed function bodies do not count)."""
        return not self.errors

    def summary(self) -> str:
        nodes = sum(self.op_counts.values())
        verdict = "OK" if self.ok else "FAIL"
        return (f"{verdict}: {self.model}: {nodes} nodes in {len(self.op_counts)} op types checked against "
                f"onnx-tensorrt docs/operators.md (TensorRT {self.tensorrt_version}): "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s), {len(self.infos)} note(s)")

    def format(self, *, show_info: bool = True) -> str:
        """One line per finding (errors first), then the replaced function bodies, the op counts, a summary."""
        order = sorted(self.findings, key=lambda f: SEVERITY_ORDER[f.severity])
        lines = [f.format() for f in order if show_info or f.severity != INFO]
        if self.shadowed:
            lines.append("-- model-local function bodies replaced by a plugin (not parsed by TensorRT; not counted):")
            lines += ["   " + f.format() for f in self.shadowed if show_info or f.severity != INFO]
        counts = ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"ops: {counts or '(none)'}")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "ok": self.ok,
            "tensorrt_version": self.tensorrt_version,
            "table_source": dict(self.source),
            "counts": {"errors": len(self.errors), "warnings": len(self.warnings), "infos": len(self.infos)},
            "op_counts": dict(sorted(self.op_counts.items())),
            "findings": [f.to_dict() for f in self.findings],
            "shadowed_function_findings": [f.to_dict() for f in self.shadowed],
            "shadowed_function_op_counts": dict(sorted(self.shadowed_op_counts.items())),
        }

