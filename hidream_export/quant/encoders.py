"""`build --quant-encoders int8|int4`: weight-only quantization of the T5 and Llama text encoders.

They are half of the pipeline's memory (9 + 16 GB in bf16). Every linear layer is quantized the way the
transformer's are (graph.py, weights.py); the token embedding tables are lookups, not matmuls, and stay in
the export dtype, as do norms. The rewrite runs on the streaming export's weightless graph
(export/encoders.py), so the encoders are quantized tensor by tensor like the transformer.
"""

from __future__ import annotations

from hidream_export.quant.export import weight_only_record
from hidream_export.quant.graph import quantize_graph
from hidream_export.quant.scheme import QuantScheme, parse_quant_name
from hidream_export.quant.weights import QuantFetch

KEPT = {"embeddings": "token embedding tables are lookups (Gather), not matmuls",
        "norms": "1-D scales"}


def quantize_encoder(model, names: list[str], mapping: dict[str, str], entries: dict, scheme: QuantScheme,
                     dtype: str):
    """Rewrite the encoder's weightless graph; returns (weights to stream, fetch for the quantized tensors,
    the manifest record). `mapping` (initializer -> checkpoint key) is updated in place."""
    import onnxruntime
    import torch

    from hidream_export.model.checkpoint import read_tensor_chunks

    sources = dict(mapping)  # float weight initializer -> checkpoint key, before the rewrite replaces them
    names, count = quantize_graph(model, names, scheme, lambda name: True, strict=False,
                                  flag="--quant-encoders")
    mapping.clear()
    for name in names:
        parsed = parse_quant_name(name)
        weight = f"{parsed[0]}.weight" if parsed else name
        mapping[name] = f"computed:{scheme.scheme} {parsed[1]} of {sources[weight]}" if parsed else sources[name]

    def float_pieces(weight: str):
        entry = entries[sources[weight]]

        def pieces():
            with open(entry.file, "rb") as fh:
                yield from read_tensor_chunks(fh, entry, torch.float32)
        return entry.shape, pieces()

    record = weight_only_record(scheme, count, dict(KEPT), onnxruntime.__version__)
    return names, QuantFetch(scheme, dtype, float_pieces, lambda module: f"{module}.weight"), record.to_dict()
