"""`torch.ops.hidream.HiDreamMoE`: the HiDreamMoE op (schema.py) as a PyTorch custom op.

Why a custom op: the routed experts become one opaque node with a fixed contract. Eager CUDA runs the
Triton grouped-GEMM kernels (kernels.py); CPU runs a plain reference loop; the fake implementation lets
torch.export / torch.compile trace through it without running anything (the node then maps 1:1 onto
the ONNX `HiDreamMoE` node and the TensorRT plugin).

    torch.ops.hidream.HiDreamMoE(hidden (T,H), selected_experts int32 (T,k), scores (T,k),
                                 gate_w (E,H,I), up_w (E,H,I), down_w (E,I,H)) -> (T,H)

The reference model's `plugin` MoE lowering calls it (hidream_export/model/moe.py); importing
`hidream_export.moe.torch_op` defines it, as torch.library defines every custom op. The shared expert is not part
of the op. Inference only: no autograd formula is registered. Triton is imported only when a CUDA tensor
reaches the op, so CPU-only installs work without it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from hidream_export.errors import MissingDependency

from . import schema

__all__ = ["hidream_moe", "moe_reference"]


def moe_reference(hidden: Tensor, selected_experts: Tensor, scores: Tensor, gate_w: Tensor, up_w: Tensor,
                  down_w: Tensor) -> Tensor:
    """The op's maths as a plain per-expert loop in torch with fp32 accumulation (any device).

    Each expert runs only on the rows that picked it; results are weighted and summed in fp32, then cast
    to the activation dtype once. `nonzero` makes row counts data-dependent (a host sync on CUDA): this is
    the readable oracle and the CPU kernel, not the fast path."""
    schema.check_tensors(hidden, selected_experts, scores, gate_w, up_w, down_w)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    x = hidden.float()
    for e in range(gate_w.shape[0]):
        tokens, slots = torch.nonzero(selected_experts == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        rows = x[tokens]
        act = F.silu(rows @ gate_w[e].float()) * (rows @ up_w[e].float())
        y = (act @ down_w[e].float()) * scores[tokens, slots].float()[:, None]
        out.index_add_(0, tokens, y)
    return out.to(hidden.dtype)


@torch.library.custom_op(schema.TORCH_OP, mutates_args=(), device_types="cpu")
def hidream_moe(hidden: Tensor, selected_experts: Tensor, scores: Tensor, gate_w: Tensor, up_w: Tensor,
                down_w: Tensor) -> Tensor:
    """Routed MoE experts (see the module docstring). This body is the CPU kernel: the reference loop."""
    return moe_reference(hidden, selected_experts, scores, gate_w, up_w, down_w)


@hidream_moe.register_kernel("cuda")
def _hidream_moe_cuda(hidden: Tensor, selected_experts: Tensor, scores: Tensor, gate_w: Tensor, up_w: Tensor,
                      down_w: Tensor) -> Tensor:
    """CUDA kernel: the Triton grouped-GEMM path (no host sync)."""
    try:
        from .kernels import moe_triton
    except ImportError as err:  # pragma: no cover - depends on the install
        raise MissingDependency(f"{schema.TORCH_OP} on CUDA needs Triton: pip install 'hidream-export[kernels]' "
                                f"({err})") from err
    return moe_triton(hidden, selected_experts, scores, gate_w, up_w, down_w)


@hidream_moe.register_fake
def _hidream_moe_fake(hidden: Tensor, selected_experts: Tensor, scores: Tensor, gate_w: Tensor, up_w: Tensor,
                      down_w: Tensor) -> Tensor:
    """Shape/dtype propagation for tracing: the output is (T, H) like hidden_states."""
    schema.check_tensors(hidden, selected_experts, scores, gate_w, up_w, down_w)
    return hidden.new_empty(hidden.shape)
