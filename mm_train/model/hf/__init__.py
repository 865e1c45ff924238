"""Hugging Face vision-language models for the multimodal engine: MindSpeed-MM's model configuration
mapped onto transformers (:mod:`.spec`), the model built, frozen, fused and sharded (:mod:`.build`),
its text decoder on a context-parallel sequence (:mod:`.context_parallel`), and the Hugging Face
directory written at each save (:mod:`.export`)."""
