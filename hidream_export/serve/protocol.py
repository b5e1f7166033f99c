"""What a served HiDream-I1 model takes and returns over KServe v2 (HTTP/gRPC): the one home of the wire contract.

Every request carries one image's arguments, each input of shape [1, 1] (Triton's batch axis, then
one value); Triton's dynamic batcher gathers requests and the model batches them itself:

    prompt           BYTES  required   UTF-8, at most MAX_PROMPT_BYTES
    negative_prompt  BYTES  optional   CFG only (guidance_scale > 1)
    seed             INT64  optional   >= 0; absent: the server draws one and returns it
    width, height    INT32  optional   pixels (HiDream's size rule applies unless any_size)
    steps            INT32  optional   the variant's recipe when absent
    guidance_scale   FP32   optional   the variant's recipe when absent
    any_size         BOOL   optional   use width x height as given
    allow_cfg        BOOL   optional   allow guidance_scale > 1 on a guidance-distilled variant (Dev, Fast)
    lora             BYTES  optional   "NAME[:SCALE][,NAME[:SCALE]...]": LoRA files in the server's --lora-dir,
                                       applied together (the served model's own input, not a GenerationRequest's)

    -> image  UINT8 [1, H, W, 3]   png  BYTES [1, 1]   seed  INT64 [1, 1]

Triton itself rejects a missing prompt, an unknown input and a wrong datatype (naming the input);
`parse_request` checks one value per input and the text fields, and the pipeline's own request check
(`Pipeline.resolve_request`) the values; both raise RequestError naming the field. The server, the Triton model
repository (config.pbtxt), the client and the benchmark all read these tables. Torch-free.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from hidream_export.errors import HiDreamExportError, RequestError, one_line
from hidream_export.lora import LoraRequest
from hidream_export.runtime.pipeline import GenerationRequest

__all__ = ["INPUTS", "OUTPUTS", "MAX_PROMPT_BYTES", "SERVER_INPUTS", "WireTensor", "encode_result", "format_loras",
           "lora_list", "parse_loras", "parse_request", "png_bytes"]

# The encoders read 128 tokens and cut the rest (with a warning, as `generate` does); this bounds the
# tokenizer's work and the request size well above that (128 tokens are rarely over 1 KB of text).
MAX_PROMPT_BYTES = 4096


@dataclass(frozen=True)
class WireTensor:
    """One input or output as KServe v2 names it (`datatype`) and as config.pbtxt declares it."""

    name: str
    datatype: str  # KServe v2 / tritonclient: BYTES, INT64, INT32, FP32, BOOL, UINT8
    dims: tuple[int, ...]  # without Triton's batch axis
    optional: bool = False

    @property
    def config_type(self) -> str:
        """config.pbtxt's data_type (TYPE_STRING is what KServe calls BYTES)."""
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"


INPUTS = (
    WireTensor("prompt", "BYTES", (1,)),
    WireTensor("negative_prompt", "BYTES", (1,), optional=True),
    WireTensor("seed", "INT64", (1,), optional=True),
    WireTensor("width", "INT32", (1,), optional=True),
    WireTensor("height", "INT32", (1,), optional=True),
    WireTensor("steps", "INT32", (1,), optional=True),
    WireTensor("guidance_scale", "FP32", (1,), optional=True),
    WireTensor("any_size", "BOOL", (1,), optional=True),
    WireTensor("allow_cfg", "BOOL", (1,), optional=True),
    WireTensor("lora", "BYTES", (1,), optional=True),
)
# Inputs the server acts on itself rather than passing to the pipeline's request.
SERVER_INPUTS = ("lora",)
OUTPUTS = (
    WireTensor("image", "UINT8", (-1, -1, 3)),
    WireTensor("png", "BYTES", (1,)),
    WireTensor("seed", "INT64", (1,)),
)
_NUMPY = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_,
          "UINT8": np.uint8}


def numpy_dtype(tensor: WireTensor) -> Any:
    return _NUMPY[tensor.datatype]


def parse_request(arrays: Mapping[str, np.ndarray]) -> GenerationRequest:
    """One request's input arrays (name -> array of shape [1, 1]) as a GenerationRequest, or RequestError
    naming the first field that is wrong."""
    values: dict[str, Any] = {}
    for tensor in INPUTS:
        array = arrays.get(tensor.name)
        if array is None:
            if not tensor.optional:
                raise RequestError(f"{tensor.name}: required input missing")
            continue
        array = np.asarray(array)
        if array.size != 1:
            raise RequestError(f"{tensor.name}: one value per request (shape [1, 1]), got shape {list(array.shape)}; "
                               f"send one request per image")
        value = array.reshape(-1)[0]
        values[tensor.name] = _text(tensor.name, value) if tensor.datatype == "BYTES" else value.item()
    return GenerationRequest(
        prompt=values["prompt"], negative_prompt=values.get("negative_prompt"), width=values.get("width"),
        height=values.get("height"), steps=values.get("steps"), guidance_scale=values.get("guidance_scale"),
        seed=values.get("seed"), any_size=bool(values.get("any_size", False)),
        allow_cfg=bool(values.get("allow_cfg", False)))


def parse_loras(arrays: Mapping[str, np.ndarray]) -> tuple[tuple[str, float], ...]:
    """The request's `lora` input as ((file name, scale), ...) in order; () without one. Names are plain
    file names in the server's LoRA folder: a path is refused, so a request never reads outside it."""
    array = arrays.get("lora")
    if array is None:
        return ()
    array = np.asarray(array)
    if array.size != 1:
        raise RequestError(f"lora: one value per request (shape [1, 1]), got shape {list(array.shape)}")
    return lora_list(_text("lora", array.reshape(-1)[0]))


def lora_list(text: str, field: str = "lora") -> tuple[tuple[str, float], ...]:
    """ "NAME[:SCALE][,NAME[:SCALE]...]" as ((file name, scale), ...); RequestError naming ``field``."""
    out = []
    for item in (part.strip() for part in str(text).strip().split(",")):
        try:
            request = LoraRequest.parse(item, field)  # the FILE[:SCALE] rule of --lora
        except HiDreamExportError as exc:  # a scale that is not finite
            raise RequestError(one_line(exc)) from None
        name = str(request.path)
        if request.path.name != name or name in (".", "..") or "\\" in name or not name.endswith(".safetensors"):
            raise RequestError(f"{field}: {item!r}: expected NAME.safetensors[:SCALE], NAME a file in the server's LoRA "
                               f"folder (no path)")
        out.append((name, request.scale))
    return tuple(out)


def format_loras(loras: Sequence[tuple[str, float]]) -> str:
    """The `lora` input's text for ((file name, scale), ...)."""
    return ",".join(f"{name}:{scale:g}" for name, scale in loras)


def _text(name: str, value: Any) -> str:
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    if len(raw) > MAX_PROMPT_BYTES:
        raise RequestError(f"{name}: {len(raw)} bytes, at most {MAX_PROMPT_BYTES} (the encoders read 128 tokens)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def png_bytes(image: Any) -> bytes:
    """The PNG file `generate -o x.png` writes for this PIL image, byte for byte (same encoder, same
    default settings)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_result(result: Any, with_png: bool = True) -> dict[str, np.ndarray]:
    """A GenerationResult as the output arrays of one response (batch axis of 1 in front); `with_png`
    False skips encoding a PNG nobody asked for."""
    outputs = {"image": np.asarray(result.image, dtype=np.uint8)[None],
               "seed": np.array([[result.seed]], dtype=np.int64)}
    if with_png:
        outputs["png"] = np.array([[png_bytes(result.image)]], dtype=np.object_)
    return outputs
