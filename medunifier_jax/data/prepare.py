r"""Prepare a real data set: read its published files, write ArrayRecord files for training.

  python -m medunifier_jax.data.prepare NAME --manual-dir DIR --data-dir DIR [--image-size N]
      [--class-set SET] [--seed S] [--per-class N] [--threads T]

NAME is one of mimic_cxr, open_i, chexpert_5x200, mimic_5x200, rsna_pneumonia,
siim_pneumothorax, covidx (docs/DATASETS.md gives each one's download and layout). A progress
bar runs per split; the summary lists the examples per split and every skipped file with the
reason. A data set already prepared with the same options is not rebuilt (its summary is read
back). Output: DATA_DIR/NAME/CONFIG/1.0.0/ with the ArrayRecord files, dataset_info.json,
manifest.csv (the split or sample definition) and skipped.csv.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medunifier_jax.data.builders import common

MAX_FILES_PER_REASON = 20  # in the printed summary; skipped.csv has them all


@dataclasses.dataclass
class Summary:
  """What prepare did: where, examples per split, skipped inputs, and whether it built."""

  name: str
  config: str
  data_path: Path
  examples: dict[str, int]
  skipped: list[common.Skipped]
  built: bool

  def format(self) -> str:
    lines = [
      f"{self.name}/{self.config}: {'prepared' if self.built else 'already prepared, reused'} "
      f"at {self.data_path}",
    ]
    for split, n in self.examples.items():
      lines.append(f"  {split}: {n} examples")
    lines.append(f"  skipped: {len(self.skipped)} files")
    by_reason = collections.defaultdict(list)
    for s in self.skipped:
      by_reason[s.reason].append(s)
    for reason, items in sorted(by_reason.items()):
      lines.append(f"    {reason}: {len(items)}")
      for s in items[:MAX_FILES_PER_REASON]:
        lines.append(f"      [{s.split}] {s.file}")
      if len(items) > MAX_FILES_PER_REASON:
        lines.append(f"      ... ({len(items) - MAX_FILES_PER_REASON} more in skipped.csv)")
    return "\n".join(lines)


def prepare(
  name: str,
  manual_dir: str | Path,
  data_dir: str | Path,
  *,
  image_size: int = 224,
  class_set: str | None = None,
  seed: int = 0,
  per_class: int = common.DEFAULT_PER_CLASS,
  num_threads: int | None = None,
) -> Summary:
  """Builds data set `name` (once) and returns its summary.

  Raises:
    KeyError: unknown name. ValueError: bad option. LayoutError: the manual directory does not
    hold the published layout (the message names the file and what was expected).
  """
  import tensorflow_datasets as tfds

  from medunifier_jax.data.builders import get_builder

  builder_cls = get_builder(name)
  if class_set is None:
    class_set = next(iter(builder_cls.CLASS_SETS), "")
  config = common.make_config(image_size, class_set, seed, per_class)
  builder = builder_cls(config=config, data_dir=str(data_dir))
  built = not builder.is_prepared()
  if built:
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir():
      raise FileNotFoundError(f"--manual-dir {manual_dir} does not exist")
    tfds.disable_progress_bar()  # the builders show their own bar per split
    if num_threads:
      builder.num_threads = num_threads
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    builder = builder_cls(config=config, data_dir=str(data_dir))  # re-read what was written
  return Summary(
    name=name,
    config=config.name,
    data_path=Path(builder.data_dir),
    examples={split: info.num_examples for split, info in sorted(builder.info.splits.items())},
    skipped=builder.skipped,
    built=built,
  )


def main(argv: Sequence[str] | None = None) -> int:
  from medunifier_jax.data.builders import BUILDERS

  parser = argparse.ArgumentParser(
    prog="python -m medunifier_jax.data.prepare", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("name", choices=sorted(BUILDERS))
  parser.add_argument("--manual-dir", required=True, help="the downloaded files, as published")
  parser.add_argument("--data-dir", required=True, help="where the prepared data set goes")
  parser.add_argument("--image-size", type=int, default=224, help="stored image side (px)")
  parser.add_argument(
    "--class-set",
    default=None,
    help="chexpert_5x200/mimic_5x200: gloria | pneumonia; covidx: three_class | binary",
  )
  parser.add_argument("--seed", type=int, default=0, help="sampling / split seed")
  parser.add_argument(
    "--per-class", type=int, default=common.DEFAULT_PER_CLASS, help="5x200 sets: images per class"
  )
  parser.add_argument(
    "--threads", type=int, default=None, help="image decoding threads (default: min(8, CPUs))"
  )
  args = parser.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's notes on custom configurations
  try:
    summary = prepare(
      args.name,
      args.manual_dir,
      args.data_dir,
      image_size=args.image_size,
      class_set=args.class_set,
      seed=args.seed,
      per_class=args.per_class,
      num_threads=args.threads,
    )
  except (common.LayoutError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary.format())
  return 0


if __name__ == "__main__":
  sys.exit(main())
