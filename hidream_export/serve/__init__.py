"""Serving engine folders behind NVIDIA Triton Inference Server (the `serve` extra).

- protocol.py    the wire contract: inputs, outputs, request parsing, PNG bytes (torch-free)
- batching.py    one Triton execution: check each request, group by size, run shared batches
- repository.py  a standard Triton model repository (config.pbtxt + Python-backend model.py per model)
- triton_model.py  the Python-backend model every generated model.py imports (runs inside Triton)
- server.py      `hidream-export serve`: the repository on the tritonserver PyTriton ships
- client.py      `hidream-export client`: one image over KServe v2 HTTP/gRPC (tritonclient)

Nothing is imported here, so `import hidream_export.serve.protocol` stays light.
"""
