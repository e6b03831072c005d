"""The code cache: every pre-training example's two code grids and report tokens, computed once
by the frozen MedUnifier, for training the prior.

Layout (by default `PRIOR_WORKDIR/codes`, config `codes.dir`):

  index.json         what the cache was made from: the MedUnifier workdir and checkpoint step,
                     its data config (the `train` split of `config.data`), grid, codebook size,
                     text length and width, shard size, number of examples, whether the text
                     states are cached; `complete` once every shard is written.
  shard-00000.npz    examples [0, S), shard-00001.npz [S, 2S), ... in source order:
                       index           int32 (m,)            the source index
                       codes_top       int16/int32 (m, g/2, g/2)
                       codes_bottom    int16/int32 (m, g, g), or (m, g, g, R) with R
                                       codes per bottom cell (vqvae.bottom_depth > 1)
                       input_ids       int32 (m, T)
                       attention_mask  int8 (m, T)
                       text_states     float32 (m, T, H)     only with cache_text_states

Each example is processed as evaluation reads it (`data.pipeline.ExampleProcessor`: the image
fitted and normalised, the whole report cleaned and tokenised) and encoded in evaluation mode
(BatchNorm running averages, no dropout), so the codes are those `Model.reconstruct` gives.
Under `data.alignment_text = "affirmed"` pre-training's TIG pass read the report without its
negated sentences; the codes here, like `reconstruct` and the prior's condition, read the whole
report (a difference in the [CLS] state that grounds the bottom level only).
A shard is written to a temporary name and renamed when complete: a rerun skips complete shards
and redoes the others. A cache whose `index.json` names another MedUnifier step or other
settings is refused (`StaleCodesError`), never silently reused.

Text states: with `cache_text_states` the Q-Former's text-mode hidden states are stored with the
codes, which suits the tiny and demo sizes. At the paper's size they are 95 x 768 floats per
report, about 100 GB over MIMIC-CXR; there the prior's training step computes them with the
frozen Q-Former instead (`prior.model.ConditionedPrior.text_encoder`), from the cached tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import tqdm
from etils import epath

from medunifier_jax import config_lib

INDEX = "index.json"
VERSION = 1


class StaleCodesError(ValueError):
  """The code cache was made from another MedUnifier checkpoint or with other settings."""


def shard_name(i: int) -> str:
  return f"shard-{i:05d}.npz"


def latest_checkpoint_step(workdir: str) -> int:
  """The newest finished checkpoint step of a training workdir (FileNotFoundError if none)."""
  folder = epath.Path(workdir) / "checkpoints"
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
  if not steps:
    raise FileNotFoundError(
      f"{workdir} has no finished checkpoint: train the MedUnifier first "
      "(python -m medunifier_jax.train --config configs/pretrain.py:demo "
      f"--workdir {workdir})"
    )
  return max(steps)


def cache_settings(
  cfg: Any, workdir: str, step: int, *, cache_text_states: bool, shard_size: int, num_examples: int
) -> dict[str, Any]:
  """The `index.json` content (without `complete`) for the MedUnifier run of `workdir` (its
  config `cfg`) at checkpoint `step`. `bottom_depth` is recorded only when above 1, so that
  caches written before it existed still match."""
  settings = {
    "version": VERSION,
    "medunifier_workdir": str(workdir),
    "medunifier_step": int(step),
    "split": "train",
    "data": json.loads(cfg.data.to_json_best_effort()),
    "grid": int(cfg.model.vqvae.grid),
    "codebook_size": int(cfg.model.vqvae.codebook_size),
    "max_text_len": int(cfg.model.max_text_len),
    "text_width": int(cfg.model.qformer.hidden_size),
    "cache_text_states": bool(cache_text_states),
    "shard_size": int(shard_size),
    "num_examples": int(num_examples),
    "num_shards": -(-int(num_examples) // int(shard_size)),
  }
  depth = config_lib.bottom_depth(cfg.model.vqvae)
  if depth > 1:
    settings["bottom_depth"] = depth
  return settings


def read_index(codes_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The cache's index, or None when there is none."""
  path = epath.Path(codes_dir) / INDEX
  return json.loads(path.read_text()) if path.exists() else None


def _write_json_atomic(path: epath.Path, content: dict[str, Any]) -> None:
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(json.dumps(content, indent=2, sort_keys=True))
  tmp.replace(path)


def check_index(found: dict[str, Any], wanted: dict[str, Any], codes_dir: str) -> None:
  """Raises `StaleCodesError` listing what differs between an existing index and the wanted
  settings."""
  keys = sorted((set(found) | set(wanted)) - {"complete"})
  # A cache with text states also serves a run that computes them each step.
  superset = {"cache_text_states"} if found.get("cache_text_states") else set()
  diffs = [
    f"  {k}: cache {found.get(k)!r}, wanted {wanted.get(k)!r}"
    for k in keys
    if found.get(k) != wanted.get(k) and k not in superset
  ]
  if diffs:
    raise StaleCodesError(
      f"the code cache in {codes_dir} was made with other settings or another MedUnifier "
      "checkpoint:\n" + "\n".join(diffs[:12]) + "\nDelete that folder to extract the codes "
      "again (a prior trained on the old codes does not fit the new model), or set "
      "--config.codes.dir to another folder."
    )


def extract_codes(
  medunifier_workdir: str,
  codes_dir: str,
  *,
  cache_text_states: bool,
  shard_size: int = 4096,
  batch_size: int = 64,
  max_examples: int = 0,
  show_progress: bool = True,
  load_model: Callable[[], Any] | None = None,
) -> dict[str, Any]:
  """Writes (or completes) the code cache of a trained MedUnifier; returns its index.

  A complete cache with the same settings is returned as it is, without loading the model.

  Args:
    medunifier_workdir: the MedUnifier's training workdir (its latest checkpoint is used).
    codes_dir: the cache folder (created).
    cache_text_states: also store the Q-Former's text-mode states (module docstring).
    shard_size: examples per shard file.
    batch_size: examples per model call (the last batch is padded, so one compilation).
    max_examples: > 0: only the first that many examples of the training split.
    show_progress: a tqdm bar over the examples still to encode.
    load_model: returns the `api.Model` of `medunifier_workdir` (default `api.load`), called
      only when there is something to encode.

  With several processes, process p writes shards p, p + P, ... and all wait for each other.

  Raises:
    StaleCodesError: the folder holds a cache of another checkpoint or other settings.
    ValueError: the workdir has no tokenizer.
  """
  from medunifier_jax import api
  from medunifier_jax.data import pipeline, registry
  from medunifier_jax.training import checkpoint as ckpt

  cfg = ckpt.load_config(medunifier_workdir)
  step = latest_checkpoint_step(medunifier_workdir)
  source = registry.get_source(cfg.data.name, "train", cfg.data)
  n = len(source) if max_examples <= 0 else min(len(source), int(max_examples))
  wanted = cache_settings(
    cfg,
    medunifier_workdir,
    step,
    cache_text_states=cache_text_states,
    shard_size=shard_size,
    num_examples=n,
  )
  folder = epath.Path(codes_dir)
  found = read_index(folder)
  if found is not None:
    check_index(found, wanted, str(folder))
    if found.get("complete"):
      return found
    # An interrupted cache is completed as it was begun (with its text states, if any), so
    # that every shard holds the same arrays.
    wanted = {k: v for k, v in found.items() if k != "complete"}
    cache_text_states = bool(wanted["cache_text_states"])
  model = (load_model or (lambda: api.load(medunifier_workdir)))()
  loaded = getattr(model, "checkpoint_step", step)
  if loaded != step:
    raise ValueError(
      f"the newest checkpoint of {medunifier_workdir} (step {step}) does not read "
      f"back (step {loaded} was loaded); repair or remove it first"
    )
  if model.tokenizer is None:
    raise ValueError(
      f"{medunifier_workdir} has no tokenizer (tokenizer/ or "
      "config.data.tokenizer_dir): its reports cannot be tokenised"
    )
  pid, count = jax.process_index(), jax.process_count()
  if pid == 0:
    folder.mkdir(parents=True, exist_ok=True)
    # Written before any shard, so that an interrupted cache is recognised (or refused) later.
    _write_json_atomic(folder / INDEX, dict(wanted, complete=False))
  _sync("code cache index")
  processor = pipeline.ExampleProcessor.from_config(source, model.tokenizer, cfg.data)
  todo = [
    s
    for s in range(wanted["num_shards"])
    if s % count == pid and not (folder / shard_name(s)).exists()
  ]
  sizes = [min(n, (s + 1) * shard_size) - s * shard_size for s in todo]
  with tqdm.tqdm(
    total=sum(sizes),
    unit="example",
    desc="codes",
    dynamic_ncols=True,
    disable=not show_progress or pid != 0,
  ) as bar:
    for s in todo:
      start, stop = s * shard_size, min(n, (s + 1) * shard_size)
      arrays = _encode_range(
        model,
        processor,
        start,
        stop,
        batch_size,
        cache_text_states,
        int(cfg.model.vqvae.codebook_size),
        bar,
      )
      tmp = folder / f".{shard_name(s)}.tmp"
      with tmp.open("wb") as f:
        np.savez(f, **arrays)
      tmp.replace(folder / shard_name(s))
  _sync("code cache shards")
  if pid == 0:
    _write_json_atomic(folder / INDEX, dict(wanted, complete=True))
  _sync("code cache complete")
  return dict(wanted, complete=True)


def _encode_range(
  model,
  processor,
  start: int,
  stop: int,
  batch_size: int,
  cache_text_states: bool,
  codebook_size: int,
  bar,
) -> dict[str, np.ndarray]:
  """Examples [start, stop) through the frozen model, in batches of `batch_size`."""
  examples = iter(
    grain.MapDataset.range(start, stop)
    .map(processor)
    .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch_size))
  )
  code_dtype = np.int16 if codebook_size <= np.iinfo(np.int16).max else np.int32
  parts: dict[str, list[np.ndarray]] = {}
  remaining = stop - start
  while remaining:
    chunk = [next(examples) for _ in range(min(batch_size, remaining))]
    m = len(chunk)
    # The last batch is padded with its final example: one batch shape, one compilation.
    chunk += [chunk[-1]] * (batch_size - m)
    batch = {
      k: np.stack([e[k] for e in chunk]) for k in ("image", "input_ids", "attention_mask", "index")
    }
    top, bottom, text = jax.device_get(
      model.fns.codes_and_text(
        model.state, batch["image"], batch["input_ids"], batch["attention_mask"]
      )
    )
    out = {
      "index": batch["index"][:m].astype(np.int32),
      "codes_top": top[:m].astype(code_dtype),
      "codes_bottom": bottom[:m].astype(code_dtype),
      "input_ids": batch["input_ids"][:m].astype(np.int32),
      "attention_mask": batch["attention_mask"][:m].astype(np.int8),
    }
    if cache_text_states:
      out["text_states"] = text[:m].astype(np.float32)
    for k, v in out.items():
      parts.setdefault(k, []).append(v)
    remaining -= m
    bar.update(m)
  return {k: np.concatenate(v) for k, v in parts.items()}


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def write_cache(
  codes_dir: str | os.PathLike,
  arrays: dict[str, np.ndarray],
  settings: dict[str, Any],
  shard_size: int,
) -> dict[str, Any]:
  """Writes a complete cache from arrays already in memory (tests and custom code sets).

  `arrays` holds the shard keys of the module docstring over all examples; `settings` the
  index fields to record (e.g. grid, codebook_size, cache_text_states).
  """
  folder = epath.Path(codes_dir)
  folder.mkdir(parents=True, exist_ok=True)
  n = len(arrays["codes_top"])
  index = dict(
    settings,
    version=VERSION,
    shard_size=int(shard_size),
    num_examples=int(n),
    num_shards=-(-n // shard_size),
    complete=True,
  )
  for s in range(index["num_shards"]):
    part = {k: np.asarray(v)[s * shard_size : (s + 1) * shard_size] for k, v in arrays.items()}
    with (folder / shard_name(s)).open("wb") as f:
      np.savez(f, **part)
  _write_json_atomic(folder / INDEX, index)
  return index


class CodeSource:
  """The whole cache in memory, random access by example and by batch of indices."""

  def __init__(self, codes_dir: str | os.PathLike):
    folder = epath.Path(codes_dir)
    index = read_index(folder)
    if index is None or not index.get("complete"):
      raise FileNotFoundError(
        f"no complete code cache in {folder}: extract it by training the prior with "
        "--config.medunifier_workdir=WORKDIR (the frozen MedUnifier's workdir)"
      )
    self.index = index
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(int(index["num_shards"])):
      with (folder / shard_name(s)).open("rb") as f, np.load(f) as shard:
        for k in shard.files:
          parts.setdefault(k, []).append(shard[k])
    self.arrays = {k: np.concatenate(v) for k, v in parts.items()}
    counts = {k: len(v) for k, v in self.arrays.items()}
    if set(counts.values()) != {index["num_examples"]}:
      raise ValueError(
        f"{folder}: the shards hold {counts} rows, the index says "
        f"{index['num_examples']} examples; delete the folder to rebuild it"
      )

  def __len__(self) -> int:
    return int(self.index["num_examples"])

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Examples `indices` (k,) as a batch: codes int32, tokens int32, states float32."""
    idx = np.asarray(indices)
    out = {}
    for k, v in self.arrays.items():
      x = v[idx]
      out[k] = x.astype(np.float32) if k == "text_states" else x.astype(np.int32)
    return out
