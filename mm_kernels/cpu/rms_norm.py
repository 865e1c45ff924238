"""RMSNorm on CPU: the C++ operators ``torch.ops.mm_kernels_cpu.*`` (csrc/rms_norm.cpp), the kernels of
:class:`mm_kernels.contract.RMSNorm` for fp32, bf16 and fp16."""

import torch

from mm_kernels._extension import cpu_extension

cpu_extension()
rms_norm_fwd = torch.ops.mm_kernels_cpu.rms_norm_fwd
rms_norm_bwd = torch.ops.mm_kernels_cpu.rms_norm_bwd
add_rms_norm_fwd = torch.ops.mm_kernels_cpu.add_rms_norm_fwd
