"""MoE permute / unpermute on CPU: the C++ operators ``torch.ops.mm_kernels_cpu.moe_*`` (csrc/moe.cpp), the
kernels of :class:`mm_kernels.contract.MoE` for fp32, bf16 and fp16 tokens. They check index values
themselves (ValueError naming the argument) before writing anything."""

import torch

from mm_kernels._extension import cpu_extension

cpu_extension()
permute_fwd = torch.ops.mm_kernels_cpu.moe_permute_fwd
unpermute_fwd = torch.ops.mm_kernels_cpu.moe_unpermute_fwd
unpermute_bwd = torch.ops.mm_kernels_cpu.moe_unpermute_bwd
sort_routing_map = torch.ops.mm_kernels_cpu.moe_sort_routing_map
gather = torch.ops.mm_kernels_cpu.moe_gather
combine = torch.ops.mm_kernels_cpu.moe_combine
combine_bwd = torch.ops.mm_kernels_cpu.moe_combine_bwd
