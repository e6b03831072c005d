"""grain input pipeline: source -> shuffle -> per-host shard -> image and text -> batches.

Training (`train_dataset`), per epoch e:

  indices 0..n-1 -> permutation (seed config.data.shuffle_seed + e)
    -> cut to a multiple of H hosts (the last n mod H positions are dropped)
    -> `ExampleProcessor`: read the record, fit it into the square (`data/images.py`, when the
       stored size differs: aspect kept, black padding), gray -> 3 channels, `image`
       normalised with config.data.image_mean/std and `target_image` in [0, 1], report
       cleaned (`text.clean_report`) and tokenised to config.data.max_text_len; with
       config.data.alignment_text = "affirmed", also the report without its negated sentences
       (`text.affirmed_sentences`), the text the alignment objectives read
    -> one stream repeated over epochs without end (or `num_epochs`), cut into host batches of
       config.batch_size / H examples; host h takes host batches h, h+H, ..., so global batch k
       is stream positions [kB, (k+1)B) in order whatever the number of hosts (the hosts are
       disjoint); computed in config.data.worker_count processes (0: this process).

Batches are numbered, and batch k is a pure function of (source, seed, host, k): the output does
not depend on the number of worker processes, and an iterator's state is its position. Save and
restore it with grain's orbax handler, next to the model state:

  ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(iterator))
  ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(iterator))

(or `iterator.get_state()` / `iterator.set_state(state)` directly); the restored iterator yields
exactly the batches the saved one would have. Restoring needs the same source, seed, batch
size, host count and worker count.

Evaluation (`eval_dataset`): no shuffle, nothing dropped. Host h reads h, h+H, ...; every host
pads its last batch (repeating a real example) to the same number of batches, and each batch
carries `mask` (bool (B,)): False on padding, so metrics skip it.

The training engine turns each host's batch into global `jax.Array`s sharded over the mesh's
data axes (`training.sharding.global_batch`).

Batches (docs/ARCHITECTURE.md, "Batches"); B host batch, S image size, T text length,
F findings:
  image float32 (B,S,S,3), target_image float32 (B,S,S,3), input_ids int32 (B,T),
  attention_mask int32 (B,T), index int32 (B,) (the source index), labels float32 (B,F) and
  label int32 (B,) when the records have them, mask bool (B,) in evaluation batches;
  align_ids / align_mask int32 (B,T) in training batches under alignment_text "affirmed".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from medunifier_jax.data import images, registry
from medunifier_jax.data import text as text_lib
from medunifier_jax.data import tokenizer as tokenizer_lib

# Thread prefetching inside each process; elements are whole batches.
DEFAULT_READ_THREADS = 2
DEFAULT_PREFETCH_BATCHES = 4


def gray_unit_image(image: Any, size: int, record_id: str) -> np.ndarray:
  """A stored image as float32 (size, size) in [0, 1]: `images.unit_image`.

  Accepts uint8 arrays (H, W), (H, W, 1) or (H, W, 3) (luminance), other integer or float
  arrays (min-max scaled, floats within [0, 1] kept as unit intensities), and PNG/JPEG/DICOM
  bytes. A stored (size, size) uint8 image is only divided by 255; any other shape is fitted
  into the square with `images.to_square` (aspect kept, black padding), as the builders do.

  Raises:
    ValueError: the image cannot be decoded or has an unsupported shape or dtype; the message
      starts with "record {record_id}".
  """
  return images.unit_image(image, size, name=f"record {record_id}")


def check_alignment_text(data_config: Any) -> str:
  """config.data.alignment_text ("report" when absent: configs that predate the option)."""
  value = data_config.get("alignment_text", "report")
  if value not in text_lib.ALIGNMENT_TEXTS:
    raise ValueError(
      f"config.data.alignment_text is {value!r}; set it to one of {text_lib.ALIGNMENT_TEXTS} "
      '("report": every objective reads the report; "affirmed": ITC, ITM and TIG read it '
      "without its negated sentences)"
    )
  return value


@dataclasses.dataclass(frozen=True, eq=False)
class ExampleProcessor:
  """Reads source[index] and turns it into one example (the per-example part of a batch).

  Picklable (worker processes receive a copy), so `source` must be too.
  """

  source: Any
  encoder: Any  # tokenizer.fixed_length_encoder(tokenizer, max_text_len)
  image_size: int
  image_mean: tuple[float, float, float]
  image_std: tuple[float, float, float]
  max_words: int | None = text_lib.DEFAULT_MAX_WORDS
  alignment_text: str = "report"  # "affirmed": also `align_ids` / `align_mask`

  @classmethod
  def from_config(
    cls, source: Any, tokenizer: Any, data_config: Any, *, training: bool = False
  ) -> ExampleProcessor:
    """The processor for `data_config`; only `training` examples carry the alignment text
    (evaluation reads the reports as they are)."""
    return cls(
      source=source,
      encoder=tokenizer_lib.fixed_length_encoder(tokenizer, int(data_config.max_text_len)),
      image_size=int(data_config.image_size),
      image_mean=tuple(float(m) for m in data_config.image_mean),
      image_std=tuple(float(s) for s in data_config.image_std),
      max_words=data_config.get("max_words", text_lib.DEFAULT_MAX_WORDS),
      alignment_text=check_alignment_text(data_config) if training else "report",
    )

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    """Example for source[index]: image/target_image (S,S,3), input_ids/attention_mask (T,),
    index (), labels (F,) / label () when the record has them, and align_ids/align_mask (T,)
    under alignment_text "affirmed"."""
    index = int(index)
    record = self.source[index]
    record_id = str(record.get("id", index))
    rgb = images.gray_to_rgb(gray_unit_image(record["image"], self.image_size, record_id))
    report = text_lib.clean_report(record["report"], self.max_words)
    tokens = tokenizer_lib.encode(self.encoder, [report])
    example = {
      "image": images.normalize(rgb, self.image_mean, self.image_std),
      "target_image": rgb,
      "input_ids": tokens["input_ids"][0],
      "attention_mask": tokens["attention_mask"][0],
      "index": np.int32(index),
    }
    if self.alignment_text == "affirmed":
      # Filtered before the cut to max_words, so kept sentences fill the freed words.
      whole = text_lib.clean_report(record["report"], max_words=None)
      affirmed = text_lib.clean_report(text_lib.affirmed_sentences(whole), self.max_words)
      align = tokenizer_lib.encode(self.encoder, [affirmed])
      example["align_ids"] = align["input_ids"][0]
      example["align_mask"] = align["attention_mask"][0]
    if record.get("labels") is not None:
      example["labels"] = np.asarray(record["labels"], np.float32)
    if record.get("label") is not None:
      example["label"] = np.int32(record["label"])
    return example


@dataclasses.dataclass(frozen=True, eq=False)
class _PaddedExample:
  """(index, valid) -> the example with `mask` = valid (evaluation padding)."""

  processor: ExampleProcessor

  def __call__(self, item: tuple[int, bool]) -> dict[str, np.ndarray]:
    index, valid = item
    example = self.processor(index)
    example["mask"] = np.bool_(valid)
    return example


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
  return shard_index, shard_count


def host_batch_size(global_batch_size: int, shard_count: int) -> int:
  """The per-host batch: global / number of hosts (must divide)."""
  if global_batch_size % shard_count:
    raise ValueError(
      f"the global batch size {global_batch_size} is not divisible by the {shard_count} "
      f"hosts; set config.batch_size to a multiple of {shard_count}"
    )
  return global_batch_size // shard_count


def shuffled_epochs(
  n: int,
  shard_count: int,
  batch: int,
  seed: int,
  num_epochs: int | None,
  *,
  where: str,
  remedy: str = "",
) -> grain.MapDataset:
  """Example indices 0..n-1 for a training stream: epoch e is epoch e of a shuffle seeded by
  `seed`, cut to a multiple of the host count; `num_epochs` of them (None: forever).

  Raises ValueError (`where` names the data: "split 'train' has", `remedy` adds to the advice)
  when a host would not get one batch of `batch` examples per epoch.
  """
  per_host = n // shard_count
  if per_host < batch:
    raise ValueError(
      f"{where} {n} examples, {per_host} per host, fewer than one host batch of {batch}; "
      f"lower config.batch_size{remedy}"
    )
  ds = grain.MapDataset.range(n).shuffle(seed=seed)
  return ds[: per_host * shard_count].repeat(num_epochs)


def _host_inputs(
  config: Any,
  tokenizer: Any,
  source: Any,
  split: str,
  shard_index: int | None,
  shard_count: int | None,
  batch_size: int | None = None,
) -> tuple[Any, int, int, int]:
  """What every dataset settles first: the tokenizer checked against the model, the source
  (default: the registered one for `split`), this host's shard and its batch size.

  Returns:
    (source, shard_index, shard_count, host batch size), the global batch being `batch_size`
    or config.batch_size.
  """
  tokenizer_lib.check_tokenizer(tokenizer, config.model)
  if source is None:
    source = registry.get_source(config.data.name, split, config.data)
  shard_index, shard_count = _shard(shard_index, shard_count)
  batch = host_batch_size(int(batch_size or config.batch_size), shard_count)
  return source, shard_index, shard_count, batch


def _prefetched(
  ds: grain.MapDataset, worker_count: int, read_threads: int, prefetch_batches: int
) -> grain.IterDataset:
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
  )
  if worker_count > 0:
    from absl import flags

    # grain's process prefetch reads its absl flags; outside an absl app (scripts, notebooks,
    # pytest) they were never parsed, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    # Batches arrive in shared memory; plain copies free it at once and outlive the workers.
    it = it.map(_copy_arrays)
  return it


def _copy_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.array(v) for k, v in batch.items()}


def train_dataset(
  config: Any,
  tokenizer: Any,
  *,
  source: Any = None,
  split: str = "train",
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_epochs: int | None = None,
  read_threads: int = DEFAULT_READ_THREADS,
  prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
) -> grain.IterDataset:
  """Shuffled, sharded, repeated training batches of config.batch_size / shard_count examples.

  Args:
    config: the full configuration (uses batch_size, data.*, model.qformer token ids).
    tokenizer: from `build_tokenizer` / `tokenizer.get_tokenizer`.
    source: a random-access source; default `registry.get_source(config.data.name, split, ...)`.
    shard_index, shard_count: this host and the number of hosts; default
      jax.process_index() / jax.process_count().
    num_epochs: None repeats forever; otherwise the last incomplete batch is dropped.
    read_threads, prefetch_batches: thread prefetching per process (batches are elements).
  """
  source, shard_index, shard_count, batch = _host_inputs(
    config, tokenizer, source, split, shard_index, shard_count
  )
  ds = shuffled_epochs(
    len(source),
    shard_count,
    batch,
    int(config.data.shuffle_seed),
    num_epochs,
    where=f"split {split!r} has",
    remedy=" or use a larger split",
  )
  ds = ds.map(ExampleProcessor.from_config(source, tokenizer, config.data, training=True))
  # Host h takes host-batches h, h + H, ... of one stream: global batch k is stream positions
  # [k B, (k + 1) B) in order on any number of hosts, so runs on 1 and on H hosts see the same
  # batches (and only the taken batches are read).
  ds = ds.batch(batch, drop_remainder=True)[shard_index::shard_count]
  return _prefetched(ds, int(config.data.worker_count), read_threads, prefetch_batches)


def eval_dataset(
  config: Any,
  tokenizer: Any,
  *,
  source: Any = None,
  split: str = "val",
  batch_size: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  read_threads: int = DEFAULT_READ_THREADS,
  prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
) -> grain.IterDataset:
  """Every example once, in order, in padded batches with a `mask` (see module docstring).

  Every host yields ceil(ceil(n / shard_count) / host batch) batches, so all hosts take part in
  every global batch. `batch_size` is global (default config.batch_size).
  """
  source, shard_index, shard_count, batch = _host_inputs(
    config, tokenizer, source, split, shard_index, shard_count, batch_size
  )
  n = len(source)
  if n == 0:
    raise ValueError(f"split {split!r} of {config.data.name!r} is empty; nothing to evaluate")
  mine = list(range(shard_index, n, shard_count))
  total = math.ceil(math.ceil(n / shard_count) / batch) * batch
  items = [(i, True) for i in mine] + [(mine[0] if mine else 0, False)] * (total - len(mine))
  ds = grain.MapDataset.source(items)
  ds = ds.map(_PaddedExample(ExampleProcessor.from_config(source, tokenizer, config.data)))
  ds = ds.batch(batch, drop_remainder=False)
  return _prefetched(ds, int(config.data.worker_count), read_threads, prefetch_batches)


def source_reports(source: Any) -> Sequence[str]:
  """Every report of a source, in order: `source.reports` when it has one (no images are
  rendered or decoded), otherwise read record by record."""
  reports = getattr(source, "reports", None)
  if reports is not None:
    return list(reports)
  return [source[i]["report"] for i in range(len(source))]


def build_tokenizer(config: Any, cache_dir: str | None = None):
  """The tokenizer for `config`: config.data.tokenizer_dir, or a vocabulary trained on the
  training split's reports and cached under `cache_dir`; checked against config.model."""
  corpus = None
  if not config.data.tokenizer_dir:
    corpus = source_reports(registry.get_source(config.data.name, "train", config.data))
  tokenizer = tokenizer_lib.get_tokenizer(config.data, corpus, cache_dir)
  tokenizer_lib.check_tokenizer(tokenizer, config.model)
  return tokenizer
