"""MedUnifier pre-training as a task of the training engine (`training.Task`).

`task(config)` wires the parts the engine must not know: the model (`model_io.build`), the four
objectives (`objectives.compute_losses`), the report-image pipeline (`data.pipeline`), the
periodic evaluators (`evaluators.registry`) and the `config.init_from` weight sources
(`weights.init_sources`). `train(config, workdir)` runs it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from medunifier_jax import model_io, objectives, paths
from medunifier_jax.training import loop, optimizer
from medunifier_jax.training.task import Task

# What the pre-training step reads from a batch (docs/ARCHITECTURE.md, "Batches").
BATCH_KEYS = ("image", "target_image", "input_ids", "attention_mask")
# The alignment text's entries, under config.data.alignment_text = "affirmed".
ALIGN_KEYS = ("align_ids", "align_mask")
IMPORT_REPORT = "import_report.json"


def aligns_affirmed(config: ml_collections.ConfigDict) -> bool:
  """Whether batches carry the alignment text (`ALIGN_KEYS`; data/pipeline.py)."""
  from medunifier_jax.data import pipeline

  return pipeline.check_alignment_text(config.data) == "affirmed"


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The batch entries the step reads: `BATCH_KEYS`, and `ALIGN_KEYS` when batches carry them."""
  return BATCH_KEYS + (ALIGN_KEYS if aligns_affirmed(config) else ())


def model_fn(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The engine's `model_fn`: `model_io.build` (what evaluation and the API build too)."""
  return model_io.build(config, rngs=rngs)


def loss_fn(config: ml_collections.ConfigDict) -> Callable:
  """`objectives.compute_losses` with the config's objective weights and label smoothing."""
  return functools.partial(
    objectives.compute_losses,
    weights={k: float(v) for k, v in config.loss_weights.items()},
    label_smoothing=float(config.label_smoothing),
    train=True,
    # A config without the key predates the option: it keeps the behaviour it was run with.
    duplicate_aware=bool(config.get("duplicate_aware_negatives", False)),
    dropout_prng=config.get("dropout_prng", None),
    itm_itg_tig_batch=int(config.get("itm_itg_tig_batch", 0)),
  )


def data_fn(config: ml_collections.ConfigDict, workdir: str) -> Iterator[dict[str, Any]]:
  """The grain pre-training iterator for `config.data` (this process's shard).

  Without `config.data.tokenizer_dir` the vocabulary trained on the reports is cached in
  `WORKDIR/tokenizer`, so a resumed run tokenises exactly as before.
  """
  from medunifier_jax.data import pipeline

  tokenizer = pipeline.build_tokenizer(config, cache_dir=f"{workdir}/tokenizer")
  return iter(pipeline.train_dataset(config, tokenizer))


def eval_fn(config: ml_collections.ConfigDict, workdir: str):
  """The periodic evaluators of `config.evals` (None when no entry is periodic)."""
  from medunifier_jax.evaluators import registry

  return registry.make_eval_fn(config, workdir)


def batch_shapes(
  config: ml_collections.ConfigDict, global_batch: int
) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one training batch of `global_batch` pairs (ahead-of-time lowering)."""
  s, t = int(config.model.vit.image_size), int(config.model.max_text_len)
  text = jax.ShapeDtypeStruct((global_batch, t), jnp.int32)
  shapes = {
    "image": jax.ShapeDtypeStruct((global_batch, s, s, 3), jnp.float32),
    "target_image": jax.ShapeDtypeStruct((global_batch, s, s, 3), jnp.float32),
    "input_ids": text,
    "attention_mask": text,
  }
  return shapes | ({k: text for k in ALIGN_KEYS} if aligns_affirmed(config) else {})


def random_batch(
  config: ml_collections.ConfigDict, seed: int = 0, global_batch: int | None = None
) -> dict[str, np.ndarray]:
  """A synthetic batch with the training batch's shapes (benchmarks and tests), host numpy."""
  rs = np.random.RandomState(seed)
  b = int(global_batch or config.batch_size)
  s, t = int(config.model.vit.image_size), int(config.model.max_text_len)
  qf = config.model.qformer
  target = rs.rand(b, s, s, 3).astype(np.float32)
  mean, std = np.asarray(config.data.image_mean, np.float32), np.asarray(config.data.image_std)
  lengths = rs.randint(t // 4, t + 1, size=b)
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  # Ids avoid the special tokens at the start of the vocabulary and [DEC] at its end.
  ids = rs.randint(5, int(qf.dec_token_id), size=(b, t)).astype(np.int32)
  ids[:, 0] = int(qf.cls_token_id)
  ids = np.where(mask == 1, ids, int(qf.pad_token_id)).astype(np.int32)
  batch = {
    "image": ((target - mean) / std).astype(np.float32),
    "target_image": target,
    "input_ids": ids,
    "attention_mask": mask,
  }
  if aligns_affirmed(config):
    # A shorter text, as a report without some of its sentences is.
    align_mask = (np.arange(t)[None, :] < np.maximum(lengths // 2, 2)[:, None]).astype(np.int32)
    batch["align_ids"] = np.where(align_mask == 1, ids, int(qf.pad_token_id)).astype(np.int32)
    batch["align_mask"] = align_mask
  return batch


def compile_synthetic_step(config: ml_collections.ConfigDict):
  """The train step compiled ahead of time on `random_batch` (for benchmarks and profiles):
  (compiled, one_step, compile_s). `one_step()` runs it once from the state the last call
  left and waits for it."""
  from medunifier_jax.training import mesh as mesh_lib
  from medunifier_jax.training import sharding as sharding_lib
  from medunifier_jax.training import state as state_lib
  from medunifier_jax.training import step as step_lib

  mesh = mesh_lib.make_mesh(config.mesh)
  graphdef, _, shardings = state_lib.abstract_train_state(config, mesh, model_fn)
  state = state_lib.init_train_state(config, shardings, model_fn)
  batch = sharding_lib.global_batch(random_batch(config), mesh, config.sharding_rules)
  rng = jax.random.key(0)
  train_step = step_lib.jit_train_step(
    step_lib.make_train_step(graphdef, config, loss_fn(config)),
    shardings,
    mesh,
    config.sharding_rules,
  )
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    jax.block_until_ready(metrics)

  return compiled, one_step, compile_s


def preflight(config: ml_collections.ConfigDict, resuming: bool) -> None:
  """`itm_itg_tig_batch` against the batch size and `config.init_from`'s syntax (always), and
  for a fresh start its placeholders, missing paths and a frozen ViT no source loads
  (`init_sources.check_fresh_start`)."""
  from medunifier_jax.weights import init_sources

  objectives.check_itm_itg_tig_batch(config.get("itm_itg_tig_batch", 0), int(config.batch_size))
  aligns_affirmed(config)  # raises on an unknown config.data.alignment_text
  sources = init_sources.parse(config.get("init_from"))
  if not resuming:
    init_sources.check_fresh_start(config, sources)


def init_fn(config: ml_collections.ConfigDict):
  """The engine's `init_fn` for `config.init_from` (None without sources).

  Writes each source into its part of the abstract model. Weights a source cannot have (e.g.
  the VQ-VAE) keep their initial values; anything else missing, unexpected or mis-shaped raises
  `WeightImportError` with the list, and frozen weights no source wrote are refused. The report
  goes to the log and to `WORKDIR/import_report.json` (process 0).
  """
  from medunifier_jax.weights import init_sources
  from medunifier_jax.weights.mapping import path_str

  sources = init_sources.parse(config.get("init_from"))
  if not sources:
    return None

  def write(model: nnx.Module, log: Callable[[str], None], workdir: str | None) -> str:
    report = init_sources.import_sources(model, config.model, sources)
    trained = nnx.filterlib.to_predicate(optimizer.trainable_filter(config.model))
    frozen = [
      path_str(path)
      for path, var in nnx.iter_graph(model)
      if isinstance(var, nnx.Param) and not trained(path, var)
    ]
    init_sources.check_frozen_loaded(report, frozen, sources)
    for line in report.summary():
      log(line)
    if workdir is not None and jax.process_index() == 0:
      path = f"{workdir}/{IMPORT_REPORT}"
      report.write(path)
      log(f"import report: {path}")
    return ", ".join(f"{init_sources.where(p)}={s}" for p, s in sources.items())

  return write


def task(config: ml_collections.ConfigDict) -> Task:
  """The pre-training task of `config` (configs/pretrain.py)."""
  return Task(
    model_fn=model_fn,
    loss_fn=loss_fn(config),
    batch_keys=batch_keys(config),
    abstract_batch=batch_shapes,
    data_fn=data_fn,
    eval_fn=eval_fn,
    init_fn=init_fn(config),
    preflight=preflight,
  )


def train(
  config: ml_collections.ConfigDict, workdir: str, *, show_progress: bool = True, **overrides: Any
) -> dict[str, Any]:
  """Pre-trains in `workdir` (resuming from its newest readable checkpoint); `overrides`
  replace fields of the task (e.g. `data_fn`, `eval_fn` in tests). Paths in `config` and the
  workdir are made absolute first."""
  workdir = paths.resolve(workdir)  # orbax needs absolute local paths
  paths.resolve_config(config)
  return loop.train(config, workdir, task(config).replace(**overrides), show_progress=show_progress)
