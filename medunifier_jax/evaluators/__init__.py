"""Downstream evaluations (DESIGN.md section 3), one module per task, looked up by name.

  zero_shot   zero-shot classification by prompt similarity      zero_shot.py
  retrieval   image<->report retrieval, R@K and both P@K kinds    retrieval.py
  finetune    two linear layers on frozen query outputs           finetune.py
  report_gen  decoded reports: n-gram scores, clinical efficacy   report_gen.py
  image_gen   images from reports: FID/KID, finding fidelity      image_gen.py
  reconstruction  VQ reconstructions: PSNR, code usage            reconstruction.py

`EVALUATORS` maps each name to its class; `build_evaluators(config, tokenizer)` makes those
`config.evals` asks for, and each evaluator's `run(model)` yields `(metric, value)` pairs.
"""

from medunifier_jax.evaluators.registry import (
  EVALUATORS,
  build_evaluators,
  get_evaluator_class,
  make_eval_fn,
  run_evaluators,
  write_results,
)

__all__ = [
  "EVALUATORS",
  "build_evaluators",
  "get_evaluator_class",
  "make_eval_fn",
  "run_evaluators",
  "write_results",
]
