"""The text-to-image half: a text-conditioned prior over the VQ-VAE's two code grids.

  codes.py      the code cache: each pre-training example's codes and report tokens, written
                once from a frozen MedUnifier (sharded, resumable, checked against the model)
  data.py       grain pipeline over the cache (shuffled, sharded per host, exact resume)
  model.py      `CodePrior` (bidirectional transformer with cross-attention to the text) and
                `ConditionedPrior` (the training module: the prior and, when the text states
                are not cached, the frozen Q-Former)
  objective.py  masked-code cross-entropy with the cosine mask schedule and condition dropout
  train.py      `task` / `train_prior`: the prior's model, loss, data and initial weights on
                the training engine (`training.loop.train`)
  sample.py     parallel decoding with classifier-free guidance, `TrainedPrior`, `load_prior`
  cost.py       FLOPs per sampled image (ahead of time) and images per second
  export.py     images to PNG files and one grid per prompt (the generate program's library)

Users call `api.load(WORKDIR).generate_images(texts)` or `python -m medunifier_jax.generate`.
"""
