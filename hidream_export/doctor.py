"""`hidream-export doctor`: what this machine can do, and why not when it cannot.

TensorRT cannot be installed on the development and CI machines, and a GPU is only on some: every
TensorRT-dependent feature must say clearly what is missing. `doctor()` collects the facts once
(libraries, versions, GPU, CUDA) and derives from them which runtime backends (ort, trt) and build targets
(onnx export, TensorRT engines, the Triton MoE lowering) are available, each with the reason when not.
The same facts give the test suite its skip reasons (hidream_export.testing.marks), so a skipped test
says exactly what doctor says.

Cheap and side-effect free: versions come from package metadata where possible; torch is not imported
(its version string says whether it is a CUDA build); the GPU is found through cuda-python or nvidia-smi.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import importlib.metadata as metadata
import os
import platform
import shutil
import subprocess
import sys

__all__ = ["doctor", "cached", "format_doctor"]

_GPU_EXTRA = "pip install 'hidream-export[gpu]'"


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _item(available: bool, version: str | None = None, reason: str | None = None, **extra) -> dict:
    return {"available": bool(available), "version": version, "reason": None if available else reason, **extra}


# ------------------------------------------------------------------------------------------------
# Individual checks
# ------------------------------------------------------------------------------------------------
def _check_tensorrt() -> dict:
    from hidream_export.moe.loader import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        wheel = _dist_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13")
        why = (f"installed ({wheel}) but not importable: {reason}" if wheel else
               f"not installed ({reason}); {_GPU_EXTRA} on a machine with an NVIDIA GPU (PyPI's tensorrt wheels "
               "fetch their libraries from NVIDIA's own package index, which this machine must be able to reach)")
        return _item(False, wheel, why)
    import tensorrt

    plugin = hasattr(tensorrt, "plugin") or importlib.util.find_spec("tensorrt.plugin") is not None
    aot = hasattr(tensorrt, "QuickPluginCreationRequest")
    return _item(True, tensorrt.__version__, python_plugins=plugin, aot_plugins=aot)


def _check_cuda_python() -> dict:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            rt = importlib.import_module(module)
        except ImportError:
            continue
        return _item(True, _dist_version("cuda-python", "cuda-bindings"), module=module, _module=rt)
    return _item(False, None, "cuda-python is not installed (pip install cuda-python); the TensorRT backend uses it "
                              "for device memory and streams")


def _gpu_from_cudart(rt) -> dict:
    """Driver/runtime versions and device 0 through cuda-python's runtime API."""
    ok = rt.cudaError_t.cudaSuccess
    err, driver = rt.cudaDriverGetVersion()
    if err != ok:
        return _item(False, reason=f"cudaDriverGetVersion failed: {err}")
    _, runtime = rt.cudaRuntimeGetVersion()
    err, count = rt.cudaGetDeviceCount()
    if err != ok or count == 0:
        return _item(False, reason=f"no CUDA device ({err if err != ok else 'count 0'}); driver {driver}",
                     driver=_cuda_version(driver))
    err, props = rt.cudaGetDeviceProperties(0)
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return _item(True, name=name.strip("\x00 "), compute_capability=f"{props.major}.{props.minor}", count=count,
                 driver=_cuda_version(driver), cuda_runtime=_cuda_version(runtime), source="cuda-python",
                 memory_gib=round(props.totalGlobalMem / 2**30, 1))


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _gpu_from_nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return _item(False, reason="no NVIDIA driver found (no cuda-python, no nvidia-smi on PATH)")
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _item(False, reason=f"nvidia-smi failed: {exc}")
    rows = [r.split(",") for r in out.stdout.strip().splitlines() if r.strip()]
    if out.returncode != 0 or not rows:
        return _item(False, reason=f"nvidia-smi found no GPU: {(out.stderr or out.stdout).strip()[:200]}")
    name, cc, driver, mem = (c.strip() for c in rows[0][:4])
    return _item(True, name=name, compute_capability=cc, count=len(rows), driver=driver, cuda_runtime=None,
                 source="nvidia-smi", memory_gib=round(float(mem) / 1024, 1) if mem.replace(".", "").isdigit() else None)


def _check_gpu(cuda_python: dict) -> dict:
    rt = cuda_python.get("_module")
    if rt is not None:
        try:
            gpu = _gpu_from_cudart(rt)
            if gpu["available"]:
                return gpu
        except Exception as exc:  # noqa: BLE001 - a broken driver install: fall back to nvidia-smi
            gpu = _item(False, reason=f"cuda-python: {type(exc).__name__}: {exc}")
        smi = _gpu_from_nvidia_smi()
        return smi if smi["available"] else gpu
    return _gpu_from_nvidia_smi()


def _check_onnxruntime() -> dict:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return _item(False, _dist_version("onnxruntime", "onnxruntime-gpu"), f"onnxruntime is not importable: {exc}")
    both = _dist_version("onnxruntime") and _dist_version("onnxruntime-gpu")
    warning = ("both onnxruntime and onnxruntime-gpu are installed; they share the import name, keep one"
               if both else None)
    return _item(True, ort.__version__, providers=ort.get_available_providers(), warning=warning)


def _check_triton(gpu: dict) -> dict:
    version = _dist_version("triton")
    if version is None:
        return _item(False, None, "triton is not installed (pip install 'hidream-export[kernels]')")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret:
        mode = "interpreter (TRITON_INTERPRET=1): kernels run on the CPU, for tests only"
    elif gpu["available"]:
        mode = f"compiled for {gpu.get('name')} (sm{gpu.get('compute_capability', '?').replace('.', '')})"
    else:
        mode = "no GPU: kernels cannot launch; set TRITON_INTERPRET=1 to run them on the CPU (tests)"
    return _item(True, version, interpreter=interpret, mode=mode)


def _check_torch() -> dict:
    version = _dist_version("torch")
    if version is None:
        return _item(False, None, "torch is not installed (pip install 'hidream-export[export]')")
    return _item(True, version, cuda_build="+cpu" not in version)


def _check_simple(module: str, dist: str, hint: str) -> dict:
    version = _dist_version(dist)
    if version is None or importlib.util.find_spec(module) is None:
        return _item(False, version, f"{dist} is not installed ({hint})")
    return _item(True, version)


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def doctor() -> dict:
    """Everything `hidream-export doctor` reports, as a JSON-able dict:

    {"python", "platform", "libraries": {name: {available, version, reason, ...}}, "gpu": {...},
     "backends": {"ort": {...}, "trt": {...}}, "build_targets": {"onnx": {...}, "trt_engines": {...},
     "triton_lowering": {...}}}"""
    cuda_python = _check_cuda_python()
    gpu = _check_gpu(cuda_python)
    libs = {
        "tensorrt": _check_tensorrt(),
        "cuda-python": {k: v for k, v in cuda_python.items() if not k.startswith("_")},
        "onnxruntime": _check_onnxruntime(),
        "triton": _check_triton(gpu),
        "torch": _check_torch(),
        "onnx": _check_simple("onnx", "onnx", "pip install 'hidream-export[export]'"),
        "onnxscript": _check_simple("onnxscript", "onnxscript", "pip install 'hidream-export[export]'"),
        "polygraphy": _check_simple("polygraphy", "polygraphy", "pip install 'hidream-export[export]'"),
        "ml_dtypes": _check_simple("ml_dtypes", "ml_dtypes", "pip install ml_dtypes; needed for bf16 I/O"),
    }
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    libs["cuda-toolkit"] = _item(nvcc is not None, None, "no nvcc (only needed to compile a C++ plugin library)",
                                 nvcc=nvcc)
    plugin_path = os.environ.get("HIDREAM_PLUGIN_PATH")

    def need(*names: str) -> str | None:
        missing = [f"{n}: {libs[n]['reason']}" for n in names if not libs[n]["available"]]
        return "; ".join(missing) if missing else None

    gpu_reason = None if gpu["available"] else f"no GPU: {gpu['reason']}"
    ort = libs["onnxruntime"]
    backends = {
        "ort": _item(ort["available"], ort["version"], ort["reason"], providers=ort.get("providers")),
        "trt": _item(not (need("tensorrt", "cuda-python") or gpu_reason), libs["tensorrt"]["version"],
                     "; ".join(r for r in (need("tensorrt", "cuda-python"), gpu_reason) if r)),
    }
    trt_plugin_reason = need("torch", "triton")
    build_targets = {
        "onnx": _item(not need("torch", "onnx", "onnxscript"), None, need("torch", "onnx", "onnxscript"),
                      detail="hidream-export export (any MoE lowering; CPU is enough)"),
        "trt_engines": _item(not (need("tensorrt", "polygraphy", "onnx") or gpu_reason), libs["tensorrt"]["version"],
                             "; ".join(r for r in (need("tensorrt", "polygraphy", "onnx"), gpu_reason) if r),
                             detail="hidream-export build --trt (the HiDreamMoE Python plugin also needs torch + "
                                    "triton" + (f": {trt_plugin_reason}" if trt_plugin_reason else "") + ")",
                             plugin_path=plugin_path),
        "triton_lowering": _item(not (need("torch", "triton") or gpu_reason), libs["triton"]["version"],
                                 "; ".join(r for r in (need("torch", "triton"),
                                                       gpu_reason and f"{gpu_reason} (the interpreter runs the "
                                                       "kernels on the CPU for tests only)") if r),
                                 detail="the `plugin` MoE lowering (torch.ops.hidream.HiDreamMoE) on CUDA"),
    }
    return {"python": sys.version.split()[0], "platform": platform.platform(), "libraries": libs, "gpu": gpu,
            "backends": backends, "build_targets": build_targets}


def _line(name: str, item: dict, detail: str = "") -> str:
    mark = "ok " if item["available"] else "-- "
    version = f" {item['version']}" if item.get("version") else ""
    text = f"  {mark} {name}{version}"
    if detail:
        text += f"  {detail}"
    if not item["available"] and item.get("reason"):
        text += f"\n        why: {item['reason']}"
    if item.get("warning"):
        text += f"\n        warning: {item['warning']}"
    return text


def format_doctor(report: dict | None = None) -> str:
    """The report as text: one line per library, the GPU, then backends and build targets with reasons."""
    r = report if report is not None else doctor()
    lines = [f"hidream-export doctor (Python {r['python']}, {r['platform']})", "libraries:"]
    for name, item in r["libraries"].items():
        extra = ""
        if name == "onnxruntime" and item.get("providers"):
            extra = "providers: " + ", ".join(item["providers"])
        elif name == "triton" and item["available"]:
            extra = item["mode"]
        elif name == "tensorrt" and item["available"]:
            extra = f"python plugins: {item['python_plugins']}, AOT plugins: {item['aot_plugins']}"
        elif name == "torch" and item["available"]:
            extra = "CUDA build" if item["cuda_build"] else "CPU build"
        elif name == "cuda-toolkit" and item["available"]:
            extra = f"nvcc at {item['nvcc']}"
        lines.append(_line(name, item, extra))
    gpu = r["gpu"]
    lines.append("gpu:")
    if gpu["available"]:
        lines.append(f"  ok  {gpu['name']} (compute capability {gpu['compute_capability']}, {gpu.get('memory_gib')} GiB), "
                     f"driver {gpu.get('driver')}, CUDA runtime {gpu.get('cuda_runtime') or '?'} [{gpu['source']}]")
    else:
        lines.append(f"  --  none\n        why: {gpu['reason']}")
    lines.append("backends:")
    for name, item in r["backends"].items():
        lines.append(_line(name, item))
    lines.append("build targets:")
    for name, item in r["build_targets"].items():
        lines.append(_line(name, item, item.get("detail", "")))
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def cached() -> dict:
    """doctor(), once per process (the facts do not change while it runs)."""
    return doctor()
