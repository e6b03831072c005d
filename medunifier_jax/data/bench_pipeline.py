r"""Input pipeline throughput: images per second of the full training pipeline on this host.

Measures what training would read: source (render or decode), resize, normalise, clean and
tokenise the report, batch, with config.data.worker_count processes. The first batch (process
start-up, source set-up) is timed apart and not counted.

  python -m medunifier_jax.data.bench_pipeline --config configs/pretrain.py:demo --batches 50
  python -m medunifier_jax.data.bench_pipeline --config configs/pretrain.py:demo \
      --config.data.worker_count=2

Prints one JSON line: images_per_s, seconds per batch, first-batch and tokenizer times.
"""

from __future__ import annotations

import json
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
_BATCHES = flags.DEFINE_integer("batches", 20, "Batches to time (after the first).")
_CACHE_DIR = flags.DEFINE_string(
  "cache_dir", None, "Where a trained vocabulary is cached (default: a temporary folder)."
)


def benchmark(config, num_batches: int, cache_dir: str) -> dict:
  """Times the first and the next `num_batches` host batches of `train_dataset`."""
  from medunifier_jax.data import pipeline

  start = time.perf_counter()
  tokenizer = pipeline.build_tokenizer(config, cache_dir=cache_dir)
  tokenizer_s = time.perf_counter() - start

  start = time.perf_counter()
  it = iter(pipeline.train_dataset(config, tokenizer, shard_index=0, shard_count=1))
  try:
    first = next(it)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    elapsed = time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()
  batch = int(first["image"].shape[0])
  return {
    "images_per_s": round(num_batches * batch / elapsed, 1),
    "batch_size": batch,
    "batches": num_batches,
    "s_per_batch": round(elapsed / num_batches, 4),
    "first_batch_s": round(first_s, 2),
    "tokenizer_s": round(tokenizer_s, 2),
    "data": config.data.name,
    "image_size": int(first["image"].shape[1]),
    "max_text_len": int(first["input_ids"].shape[1]),
    "worker_count": int(config.data.worker_count),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("pass --config configs/pretrain.py:VARIANT")
  if _CACHE_DIR.value:
    result = benchmark(_CONFIG.value, _BATCHES.value, _CACHE_DIR.value)
  else:
    with tempfile.TemporaryDirectory() as cache_dir:
      result = benchmark(_CONFIG.value, _BATCHES.value, cache_dir)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
