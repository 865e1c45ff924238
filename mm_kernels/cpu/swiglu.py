"""SwiGLU on CPU: the C++ operators ``torch.ops.mm_kernels_cpu.swiglu_*`` (csrc/swiglu.cpp), the kernels
of :class:`mm_kernels.contract.SwiGLU` for fp32, bf16 and fp16."""

import torch

from mm_kernels._extension import cpu_extension

cpu_extension()
swiglu_fwd = torch.ops.mm_kernels_cpu.swiglu_fwd
swiglu_bwd = torch.ops.mm_kernels_cpu.swiglu_bwd
swiglu_pair_fwd = torch.ops.mm_kernels_cpu.swiglu_pair_fwd
swiglu_pair_bwd = torch.ops.mm_kernels_cpu.swiglu_pair_bwd
