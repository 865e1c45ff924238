"""What a platform without an accelerator needs to run megatron-core (:mod:`mm_train.platform.cpu_adaptor`)."""
