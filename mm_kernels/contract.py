"""The kernel contract: one declared interface per op family, implemented by every backend.

A family (:class:`RMSNorm`, :class:`SwiGLU`, :class:`MoE`, :class:`Attention`) lists its kernels as
typed functions. Each becomes the operator ``torch.ops.mm_kernels.<prefix><name>`` with the schema
inferred from the declaration (:mod:`mm_kernels.ops._kernel_op`), and each backend module
``mm_kernels.<backend>.<family.module>`` (backend in reference, cpu, triton, npu) defines a function of
the same name with the same parameters. ``tests/test_contract.py`` checks both.

Rules every implementation follows:
- it returns new tensors (never an input or a view of one), in the layout the declaration gives;
  a gradient the op does not produce (no weight, no probs) may be returned as None;
- fused kernels take the dtypes of :data:`mm_kernels.precision.KERNEL_DTYPES`; other floating-point
  inputs (fp64) never reach them, they run the reference;
- values that need the data (indices) are checked by the op before the kernel runs;
- statistics and sums are accumulated in :func:`mm_kernels.precision.compute_dtype`.
"""

from collections.abc import Callable
from typing import Optional

from torch import Tensor


class Family:
    """An op family: its kernels are the static methods of the subclass, in declaration order."""

    module: str  # the backend modules are mm_kernels.<backend>.<module>
    prefix: str = ""  # the operators are mm_kernels::<prefix><kernel name>

    @classmethod
    def kernels(cls) -> dict[str, Callable]:
        """{kernel name: declaration} of this family."""
        return {name: value.__func__ for name, value in vars(cls).items() if isinstance(value, staticmethod)}


class RMSNorm(Family):
    """RMSNorm (see :mod:`mm_kernels.ops.rms_norm` for the casting modes)."""

    module = "rms_norm"

    @staticmethod
    def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float, casting: str,
                     offset: float) -> tuple[Tensor, Tensor]:
        """x [..., H], weight [H] | None -> (y [..., H] in x.dtype, rstd [...] in compute_dtype(x.dtype))."""

    @staticmethod
    def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, eps: float, casting: str,
                     offset: float) -> tuple[Tensor, Tensor]:
        """Gradients of rms_norm_fwd: (dx like x, dweight like weight), dweight summed in a fixed order."""

    @staticmethod
    def add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                         eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """(x + residual) then llama RMSNorm -> (y, rstd, x + residual in x.dtype); all [..., H] but rstd [...]."""


class SwiGLU(Family):
    """SwiGLU, silu(a) * b computed in compute_dtype (see :mod:`mm_kernels.ops.swiglu`)."""

    module = "swiglu"

    @staticmethod
    def swiglu_fwd(x: Tensor, dim: int) -> Tensor:
        """x [..., 2F, ...] (2F at ``dim`` >= 0) -> y [..., F, ...] in x.dtype, contiguous."""

    @staticmethod
    def swiglu_bwd(dy: Tensor, x: Tensor, dim: int) -> Tensor:
        """Gradient of swiglu_fwd: dy [..., F, ...] -> dx like x, contiguous."""

    @staticmethod
    def swiglu_pair_fwd(gate: Tensor, up: Tensor) -> Tensor:
        """gate, up [...] (same shape and dtype) -> silu(gate) * up [...] in gate.dtype, contiguous."""

    @staticmethod
    def swiglu_pair_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of swiglu_pair_fwd: (dgate, dup), contiguous."""


class MoE(Family):
    """MoE permute / unpermute (semantics in :mod:`mm_kernels.reference.moe`).

    Index form: slot s = t * K + k of indices [T, K]; sorted_indices[s] is the output row of slot s.
    Row form: row r of a permuted tensor holds token row_token[r].
    """

    module = "moe"
    prefix = "moe_"

    @staticmethod
    def permute_fwd(tokens: Tensor, indices: Tensor, num_rows: int, num_experts: int) -> tuple[Tensor, Tensor]:
        """tokens [T, H], indices [T, K] int (experts < num_experts; -1: unbounded) ->
        (permuted [num_rows, H], sorted_indices [T * K] int32)."""

    @staticmethod
    def unpermute_fwd(permuted: Tensor, sorted_indices: Tensor, probs: Optional[Tensor], num_tokens: int) -> Tensor:
        """permuted [N, H], sorted_indices [T * K] (a permutation of [0, T * K)), probs [T, K] | None -> [T, H],
        summed in fp32; slots with a row >= N add nothing."""

    @staticmethod
    def unpermute_bwd(dout: Tensor, permuted: Tensor, sorted_indices: Tensor,
                      probs: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Gradients of unpermute_fwd: (dpermuted like permuted, dprobs like probs)."""

    @staticmethod
    def sort_routing_map(routing_map: Tensor, capacity: int) -> Tensor:
        """routing_map [T, E] bool -> row_slot [N] int64 (t * E + e of each row); capacity < 0 keeps every
        routed pair, else each expert gets min(capacity, T) rows (routed tokens, then unrouted ones)."""

    @staticmethod
    def gather(src: Tensor, row_token: Tensor) -> Tensor:
        """src [T, H], row_token [N] int -> out [N, H], out[r] = src[row_token[r]]."""

    @staticmethod
    def combine(src: Tensor, row_token: Tensor, row_weight: Optional[Tensor], num_tokens: int) -> Tensor:
        """src [N, H], row_token [N] int, row_weight [N] | None -> out [num_tokens, H], summed per token in fp32."""

    @staticmethod
    def combine_bwd(dout: Tensor, src: Tensor, row_token: Tensor,
                    row_weight: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Gradients of combine: (dsrc like src, drow_weight like row_weight)."""


class Attention(Family):
    """Attention with log-sum-exp (see :mod:`mm_kernels.ops.attention`)."""

    module = "attention"

    @staticmethod
    def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D] q.dtype, lse [B, Hq, Sq] compute dtype)."""

    @staticmethod
    def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                      scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients (dq, dk, dv) like (q, k, v) of attention_fwd, given dout and the forward's (out, lse)."""


FAMILIES = (RMSNorm, SwiGLU, MoE, Attention)
