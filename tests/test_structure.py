"""The tree's contracts about itself: no import circle, a self-contained reference model, one home for the
HiDreamMoE rules, normal file permissions, and comments that do not cite documents outside the repository."""

from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from onnx import TensorProto, helper

import hidream_export
from hidream_export.errors import MoEContractError
from hidream_export.lint import ERROR, lint_onnx
from hidream_export.moe import schema, torch_op, trt_plugin  # noqa: F401  (torch_op defines the torch op)

PACKAGE = Path(hidream_export.__file__).parent
REPO = PACKAGE.parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module `name` imports, at any level (top of the module or inside a function)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_guard_finds_a_circle(tmp_path, monkeypatch):
    """The walk above sees function-level imports too: a lazy import back into the importer is a circle."""
    modules = {"hidream_export.a": tmp_path / "a.py", "hidream_export.b": tmp_path / "b.py"}
    modules["hidream_export.a"].write_text("from hidream_export import b\n")
    modules["hidream_export.b"].write_text("def f():\n    from hidream_export.a import x\n")
    assert _imports("hidream_export.a", modules["hidream_export.a"], modules) == {"hidream_export.b"}
    assert _imports("hidream_export.b", modules["hidream_export.b"], modules) == {"hidream_export.a"}


def test_the_model_imports_nothing_of_the_toolchain():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("hidream_export.model"):
            outside = {m for m in _imports(name, path, modules) if not m.startswith("hidream_export.model")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_model_imports_from_a_plain_checkout(tmp_path):
    """PYTHONPATH=<checkout> without `pip install`: the model loads, runs, and pulls in nothing else."""
    shutil.copytree(PACKAGE, tmp_path / "hidream_export", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, torch, hidream_export.model as m\n"
            "assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
            "model = m.HiDreamTransformer('tiny').eval()\n"
            "others = sorted(k for k in sys.modules if k.startswith('hidream_export.') "
            "and not k.startswith('hidream_export.model'))\n"
            "print(others)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- one home for the HiDreamMoE rules ------------------------------------------------------------------

T, H, I, E = 6, 8, 16, 4


def _tensors(ids_dtype=torch.int32, k=2, scores_dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(max(E, k), generator=g)[:k] for _ in range(T)]).to(ids_dtype)
    return (torch.randn(T, H, generator=g), ids, torch.rand(T, k, generator=g).to(scores_dtype),
            torch.randn(E, H, I, generator=g), torch.randn(E, H, I, generator=g), torch.randn(E, I, H, generator=g))


BAD_INPUTS = {
    "int64 ids": dict(ids_dtype=torch.int64),
    "top_k > experts": dict(k=5),
    "mixed dtypes": dict(scores_dtype=torch.float16),
}


def _torch_op(args):
    torch.ops.hidream.HiDreamMoE(*args)


def _triton_entry(args):
    from hidream_export.moe.kernels import moe_triton

    moe_triton(*args)


def _trt_shape_function(args):
    trt_plugin.moe_output_desc([(tuple(a.shape), a.dtype) for a in args], top_k=args[1].shape[1], num_experts=E)


def _lint(args):
    elem = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.int32: TensorProto.INT32,
            torch.int64: TensorProto.INT64}
    infos = [helper.make_tensor_value_info(n, elem[a.dtype], list(a.shape)) for n, a in zip(schema.INPUT_NAMES, args)]
    node = helper.make_node(schema.OP_TYPE, list(schema.INPUT_NAMES), ["y"], domain=schema.DOMAIN,
                            **schema.node_attributes(args[1].shape[1], E))
    graph = helper.make_graph([node], "g", infos, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, H])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(schema.DOMAIN, 1)])
    errors = [f.message for f in lint_onnx(model, infer_types=False).findings if f.severity == ERROR]
    if errors:
        raise MoEContractError(errors[0].split(": ", 1)[1])


CONSUMERS = {"torch op": _torch_op, "Triton entry point": _triton_entry, "TensorRT shape function":
             _trt_shape_function, "lint": _lint}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_every_consumer_gives_the_same_error(bad):
    pytest.importorskip("triton", reason="the Triton entry point needs triton (the kernels extra)")
    messages = {}
    for name, consumer in CONSUMERS.items():
        with pytest.raises(MoEContractError) as err:
            consumer(_tensors(**BAD_INPUTS[bad]))
        messages[name] = str(err.value)
    assert len(set(messages.values())) == 1, messages
    assert next(iter(messages.values())).startswith("HiDreamMoE: ")


def test_good_inputs_pass_every_consumer():
    args = _tensors()
    _torch_op(args)
    _trt_shape_function(args)
    _lint(args)


# ---- files the tool writes --------------------------------------------------------------------------------

def test_engine_folders_and_reports_have_normal_permissions(built, tmp_path):
    """Under umask 022 (set in conftest.py), every file the build and generate write is 0644 and every
    folder 0755 (mkstemp's 0600 and mkdtemp's 0700 must not leak into the output)."""
    from hidream_export.cli import main as cli_main

    assert os.umask(0o022) == 0o022
    report, image = tmp_path / "r.json", tmp_path / "i.png"
    assert cli_main(["generate", str(built.folder("full")), "--prompt", "a cat", "--seed", "1", "--steps", "1",
                     "--quiet", "--json", str(report), "-o", str(image)]) == 0
    paths = [*built.root.rglob("*"), report, image]  # built.root itself is pytest's (mkdtemp: 0700)
    wrong = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths if not p.is_symlink() and
             stat.S_IMODE(p.stat().st_mode) != (0o755 if p.is_dir() else 0o644)]
    assert not wrong, wrong


# ---- comments stand alone ---------------------------------------------------------------------------------

CITATIONS = re.compile(r"shared/docs|spec quirk|spec section|spec \d|anchors §|anchors \w*§|deployment-anchors|hidream-i1-spec|"
                       r"the \w+ issue (adds|will)|issue #?\d+", re.IGNORECASE)


def test_comments_cite_nothing_outside_the_repository():
    """The package (code and data), the tests and the tools; this file's own pattern excepted."""
    files = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.json"), *(REPO / "tests").rglob("*.py"),
             *(REPO / "tools").rglob("*.py")]
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files if p.resolve() != Path(__file__).resolve()
            for i, line in enumerate(p.read_text().splitlines(), 1) if CITATIONS.search(line)]
    assert not hits, hits
