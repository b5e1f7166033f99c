"""`hidream-export client`: one image from a served model, over KServe v2 HTTP or gRPC (tritonclient).

    with connect("http://127.0.0.1:8000") as client:    # or grpc://host:8001; no scheme means http
        result = request_image(client, GenerationRequest("a red fox", seed=0))
    Path("fox.png").write_bytes(result.png)            # the bytes `generate -o fox.png` writes

`--model` defaults to the only model the server has ready (from its repository index). A request the
server refuses comes back as RequestError with the server's one line naming the field; a server that
cannot be reached or fails as ServeError. The bench (tools/bench_serve.py) drives the same functions.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np

from hidream_export.errors import MissingDependency, RequestError, ServeError
from hidream_export.runtime.pipeline import GenerationRequest
from hidream_export.serve import protocol

__all__ = ["Client", "ClientOptions", "ClientResult", "client_to_file", "connect", "request_image", "served_models"]


@dataclass(frozen=True)
class ClientOptions:
    url: str
    request: GenerationRequest
    output: Path
    model: str | None = None
    timeout_s: float = 600.0
    loras: tuple[tuple[str, float], ...] = ()  # file names in the server's --lora-dir, with scales


@dataclass(frozen=True)
class Client:
    """A tritonclient connection (http or grpc flavour) and the server it reaches."""

    url: str
    module: Any  # tritonclient.http or tritonclient.grpc
    client: Any

    @property
    def grpc(self) -> bool:
        return self.module.__name__.endswith("grpc")

    def close(self) -> None:
        """Close the connections: a server shutting down waits for its clients' open connections."""
        self.client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_) -> None:
        self.close()


@dataclass
class ClientResult:
    model: str
    seed: int
    png: bytes
    seconds: float  # request to response, as the client saw it
    output: Path | None = None

    def image(self) -> np.ndarray:
        """The pixels (H, W, 3) uint8, decoded from the PNG."""
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.png)).convert("RGB"))


def connect(url: str, timeout_s: float = 600.0) -> Client:
    """A client for `url`: http://host:port, grpc://host:port, or host:port (http)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "grpc") or not parsed.hostname or parsed.port is None:
        raise RequestError(f"URL {url!r} must look like http://HOST:PORT or grpc://HOST:PORT")
    address = f"{parsed.hostname}:{parsed.port}"
    try:
        if parsed.scheme == "grpc":
            import tritonclient.grpc as module

            client = module.InferenceServerClient(url=address)
        else:
            import tritonclient.http as module

            client = module.InferenceServerClient(url=address, connection_timeout=min(timeout_s, 60.0),
                                                  network_timeout=timeout_s)
    except ImportError:
        raise MissingDependency("tritonclient is not installed; `client` needs the serve extra: "
                                "pip install \"hidream-export[serve]\"") from None
    return Client(f"{parsed.scheme}://{address}", module, client)


def served_models(client: Client) -> list[str]:
    """Names of the models the server has ready."""
    index = _call(client, "the repository index", client.client.get_model_repository_index)
    if client.grpc:
        return sorted(m.name for m in index.models if m.state == "READY")
    return sorted(m["name"] for m in index if m.get("state") == "READY")


def pick_model(client: Client, model: str | None) -> str:
    if model is not None:
        return model
    names = served_models(client)
    if len(names) != 1:
        raise RequestError(f"--model: {client.url} serves {names or 'no ready model'}; name one with --model")
    return names[0]


def request_image(client: Client, request: GenerationRequest, model: str | None = None,
                  timeout_s: float | None = None, loras: Sequence[tuple[str, float]] = ()) -> ClientResult:
    """Generate one image on the server (its arguments as the runtime takes them; None: the server's default).
    ``loras``: (file name in the server's --lora-dir, scale) pairs applied together for this image."""
    wire = {t.name for t in protocol.INPUTS}
    local = [f.name for f in fields(request)
             if f.name not in wire and getattr(request, f.name) is not None and getattr(request, f.name) is not False]
    if local:
        raise RequestError(f"{', '.join(local)} cannot be sent to a server (it takes {sorted(wire)})")
    model = pick_model(client, model)
    inputs = []
    for tensor in protocol.INPUTS:
        value = protocol.format_loras(loras) if tensor.name == "lora" and loras else getattr(request, tensor.name, None)
        if value is None or (tensor.datatype == "BOOL" and not value):  # absent flags are false
            continue
        if tensor.datatype == "BYTES":
            array = np.array([[str(value).encode("utf-8")]], dtype=np.object_)
        else:
            array = np.array([[value]], dtype=protocol.numpy_dtype(tensor))
        item = client.module.InferInput(tensor.name, [1, 1], tensor.datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    outputs = [client.module.InferRequestedOutput(name) for name in ("png", "seed")]
    kwargs = {"client_timeout": timeout_s} if client.grpc and timeout_s else {}
    start = time.perf_counter()
    response = _call(client, f"model {model!r}", client.client.infer, model, inputs, outputs=outputs, **kwargs)
    seconds = time.perf_counter() - start
    png = response.as_numpy("png").reshape(-1)[0]
    return ClientResult(model, int(response.as_numpy("seed").reshape(-1)[0]), bytes(png), seconds)


def _call(client: Client, what: str, fn, *args, **kwargs):
    from tritonclient.utils import InferenceServerException

    try:
        return fn(*args, **kwargs)
    except InferenceServerException as exc:
        message = " ".join(str(exc.message() or exc).split())
        status = str(exc.status() or "")
        if status in ("400", "StatusCode.INVALID_ARGUMENT"):
            raise RequestError(f"{client.url} {what}: {message}") from None
        raise ServeError(f"{client.url} {what}: {message}") from None
    except OSError as exc:  # refused, reset, timed out (http); grpc reports these as InferenceServerException
        raise ServeError(f"{client.url} {what}: {exc.strerror or exc}") from None


def client_to_file(options: ClientOptions) -> ClientResult:
    """Check -o first, ask the server for the image, write it (the server's PNG as it is for .png)."""
    from hidream_export.files import atomic_open
    from hidream_export.runtime.generate import check_output, image_format

    output = Path(options.output)
    check_output(output, "-o")
    with connect(options.url, options.timeout_s) as client:
        result = request_image(client, options.request, options.model, options.timeout_s, options.loras)
    fmt = image_format(output)
    with atomic_open(output, "wb", suffix=output.suffix) as fh:
        if fmt == "PNG":
            fh.write(result.png)
        else:
            from PIL import Image

            Image.fromarray(result.image()).save(fh, format=fmt)
    result.output = output
    return result
