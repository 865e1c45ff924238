"""Checkpoints: the atomic write and the latest-iteration marker (:mod:`~mm_train.checkpoint.atomic`),
what is restored besides weights (:mod:`~mm_train.checkpoint.state`), and one module per format:
``--ckpt-format torch`` (:mod:`~mm_train.checkpoint.torch_format`) and ``torch_dcp``
(:mod:`~mm_train.checkpoint.dcp`). Each engine saves and loads in its own format."""
