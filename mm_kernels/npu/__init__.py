"""NPU backend: torch_npu fused operators, as MindSpeed calls them."""
