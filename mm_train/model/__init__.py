"""The GPT model: its construction from the run's config (:mod:`mm_train.model.build`) and the
layout-independent parameter initialisation (:mod:`mm_train.model.init`)."""
