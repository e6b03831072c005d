"""What every evaluator shares: compiled model functions, data reading, settings.

Evaluators take the model as an `nnx.Module` (the `MedUnifier` the training loop holds) or an
`api.Model` (its `.module` is used). The model's functions are `inference.model_fns(graphdef)`,
compiled once per graph definition and input shape with the weights passed as an argument, so
periodic evaluation during training reuses the compilation.

Evaluation reads every example once, in order, on every process (`pipeline.eval_dataset` with
one shard): each process passes identical inputs, as multi-host `jax.jit` calls require.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medunifier_jax import inference
from medunifier_jax.objectives import itc_similarity


def split_model(model: Any) -> tuple[nnx.GraphDef, nnx.State]:
  """nnx.Module | api.Model -> (graphdef, state)."""
  module = getattr(model, "module", model)
  if not isinstance(module, nnx.Module):
    raise TypeError(f"expected a MedUnifier nnx.Module or an api.Model, got {type(model).__name__}")
  return nnx.split(module)


@functools.partial(jax.jit, static_argnames=("chunk",))
def similarity_matrix(image_emb: jax.Array, text_emb: jax.Array, chunk: int = 256) -> jax.Array:
  """All images against all texts, `chunk` images at a time (bounds the (chunk, M, Q) buffer).

  Args:
    image_emb: (N, Q, E) L2-normalised query embeddings.
    text_emb: (M, E) L2-normalised text embeddings.
  Returns:
    (N, M) float32.
  """
  n = image_emb.shape[0]
  chunk = max(1, min(chunk, n))
  pad = (-n) % chunk
  padded = jnp.pad(image_emb, ((0, pad), (0, 0), (0, 0)))
  blocks = padded.reshape((-1, chunk) + image_emb.shape[1:])
  sims = jax.lax.map(lambda block: itc_similarity(block, text_emb), blocks)
  return sims.reshape(-1, text_emb.shape[0])[:n]


class Evaluator:
  """Base of the task evaluators: settings, data sets and cached compiled functions.

  Subclasses set `task` and implement `evaluate(dataset, graphdef, state)`, yielding
  `(metric, value)` pairs; `run(model)` yields them as `("{dataset}/{metric}", value)`.
  """

  task = ""

  def __init__(self, config, task_config, tokenizer):
    """config: the full configuration; task_config: `config.evals[task]`; tokenizer: the
    model's (`data.pipeline.build_tokenizer`)."""
    self.config = config
    self.cfg = task_config
    self.tokenizer = tokenizer
    self.datasets = tuple(task_config.datasets)
    if not self.datasets:
      raise ValueError(f"config.evals.{self.task}.datasets is empty; name at least one data set")
    self.outputs: dict[str, dict[str, Any]] = {}  # per data set: arrays for reports and plots

  def fns(self, graphdef) -> inference.ModelFns:
    """The compiled functions of this graph (shared by every evaluator and the API)."""
    return inference.model_fns(graphdef)

  def describe(self) -> str:
    """One line naming the protocol variant behind this entry's figures ("" when there is only
    one), for whatever prints them next to the figures."""
    return ""

  def settings(self) -> dict:
    """The protocol settings used (JSON-friendly), written next to the results."""
    return to_python(self.cfg.to_dict() if hasattr(self.cfg, "to_dict") else self.cfg)

  def run(self, model) -> Iterator[tuple[str, float]]:
    graphdef, state = split_model(model)
    for dataset in self.datasets:
      for metric, value in self.evaluate(dataset, graphdef, state):
        yield f"{dataset}/{metric}", float(value)

  def evaluate(self, dataset: str, graphdef, state) -> Iterator[tuple[str, float]]:
    raise NotImplementedError

  def source(self, dataset: str, split: str):
    from medunifier_jax.data import registry

    return registry.get_source(dataset, split, self.config.data)


class EvalBatches:
  """Fixed-shape batches of a source as NumPy dicts (last one padded; `mask` marks real rows).

  Has a length, so progress bars know the total.
  """

  def __init__(self, config, tokenizer, source, batch_size: int):
    from medunifier_jax.data import pipeline

    self._ds = pipeline.eval_dataset(
      config, tokenizer, source=source, batch_size=batch_size, shard_index=0, shard_count=1
    )
    self._len = math.ceil(len(source) / batch_size)

  def __len__(self) -> int:
    return self._len

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for batch in self._ds:
      yield {k: np.asarray(v) for k, v in batch.items()}


def run_in_chunks(fn, arrays: dict[str, np.ndarray], chunk: int) -> list:
  """Calls fn(**chunk_arrays) on fixed-size row chunks (the last padded by repeating row 0).

  Returns the per-chunk outputs trimmed to the real rows, as NumPy. One shape, one compilation.
  """
  n = len(next(iter(arrays.values())))
  out = []
  for start in range(0, n, chunk):
    part = {k: v[start : start + chunk] for k, v in arrays.items()}
    real = len(next(iter(part.values())))
    if real < chunk:
      part = {
        k: np.concatenate([v, np.repeat(v[:1], chunk - real, axis=0)]) for k, v in part.items()
      }
    out.append(jax.tree.map(lambda x, r=real: np.asarray(x)[:r], fn(**part)))
  return out


def setting_choice(task_config, task: str, key: str, default: str, choices) -> str:
  """`config.evals.{task}.{key}` (`default` when unset) as a string, refused unless it is one
  of `choices`: evaluators check their settings when built, so a typo fails before any image
  is encoded."""
  value = str(task_config.get(key, default))
  if value not in choices:
    raise ValueError(f"config.evals.{task}.{key} is {value!r}; choose one of {tuple(choices)}")
  return value


def source_class_names(source, dataset: str) -> tuple[str, ...]:
  names = getattr(source, "class_names", None)
  if not names:
    raise ValueError(
      f"data set {dataset!r} has no class_names; this task needs a "
      "classification source (one with `class_names` and a `label` per record)"
    )
  return tuple(names)


def to_python(settings: dict) -> dict:
  """Config values -> JSON-friendly Python (tuples to lists, ConfigDicts to dicts)."""
  out = {}
  for k, v in dict(settings).items():
    if hasattr(v, "to_dict"):
      v = to_python(v.to_dict())
    elif isinstance(v, tuple):
      v = list(v)
    out[k] = v
  return out


BATCH_KEYS = ("label", "labels", "index", "input_ids", "attention_mask")


def collect_features(
  fns: inference.ModelFns,
  state,
  batches,
  *,
  image_keys=("image_emb",),
  text: bool = False,
  desc: str = "",
) -> dict[str, np.ndarray]:
  """Runs the compiled encoders over evaluation batches; keeps the real (unpadded) rows.

  Returns the requested image features (`image_emb` (N, Q, E), `queries` (N, Q, H),
  `image_tokens` (N, 1 + P, Dv)), `text_emb` (N, E) when `text`, and the batch fields in
  `BATCH_KEYS` that the data set has.
  """
  from tqdm.auto import tqdm

  out: dict[str, list] = {}
  for batch in tqdm(batches, desc=desc or "encoding", leave=False, disable=not desc):
    keep = batch["mask"].astype(bool)
    feats = fns.image_features(state, batch["image"])
    rows = {k: feats[k] for k in image_keys}
    if text:
      rows["text_emb"] = fns.text_features(state, batch["input_ids"], batch["attention_mask"])[
        "text_emb"
      ]
    rows.update({k: batch[k] for k in BATCH_KEYS if k in batch})
    for k, v in rows.items():
      out.setdefault(k, []).append(np.asarray(v)[keep])
  if not out:
    raise ValueError("the data set yielded no batches")
  return {k: np.concatenate(v) for k, v in out.items()}


class Subset:
  """The first `n` records of a source (keeps `class_names` and `reports` when present)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(int(n), len(source))
    if hasattr(source, "class_names"):
      self.class_names = source.class_names
    reports = getattr(source, "reports", None)
    if reports is not None:
      self.reports = list(reports)[: self.n]

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int):
    if not 0 <= i < self.n:
      raise IndexError(f"index {i} outside the {self.n} records of this subset")
    return self.source[i]
