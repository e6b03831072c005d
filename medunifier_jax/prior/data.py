"""grain input pipeline over the code cache: shuffle per epoch, shard per host, batch.

Global batch k is positions [kB, (k + 1)B) of one stream that visits every cached example once
per epoch, in the order of a permutation seeded by `codes.shuffle_seed` (and the epoch); host h
of H takes host batches h, h + H, ... of B / H examples, as the pre-training pipeline does
(`data/pipeline.py`). The iterator's state is its position (`get_state` / `set_state`), so
the training engine's checkpoints resume it exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from medunifier_jax.data.pipeline import host_batch_size, shuffled_epochs
from medunifier_jax.prior.codes import CodeSource


@dataclasses.dataclass(frozen=True, eq=False)
class _Take:
  """indices (b,) -> that batch of cached examples (see `CodeSource.take`)."""

  source: CodeSource

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self.source.take(indices)


def code_dataset(
  config: Any, source: CodeSource, *, shard_index: int | None = None, shard_count: int | None = None
) -> grain.IterDataset:
  """Endless shuffled host batches of `config.batch_size / shard_count` cached examples.

  Batches hold `codes_top` (b, g/2, g/2), `codes_bottom` (b, g, g) or (b, g, g, R), `input_ids`,
  `attention_mask` (b, T) int32, `index` (b,), and `text_states` (b, T, H) float32 when cached.
  """
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  batch = host_batch_size(int(config.batch_size), shard_count)
  seed = int(config.codes.shuffle_seed)
  ds = shuffled_epochs(len(source), shard_count, batch, seed, None, where="the code cache holds")
  # Indices are batched first and gathered in one step: a vectorised read of the cache.
  ds = ds.batch(batch, drop_remainder=True)[shard_index::shard_count].map(_Take(source))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
