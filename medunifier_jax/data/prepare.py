r"""Prepare a real data set: read its published files, write ArrayRecord files for training.

  python -m medunifier_jax.data.prepare NAME --manual-dir DIR --data-dir DIR [--image-size N]
      [--class-set SET] [--seed S] [--per-class N] [--held-out PATH|none] [--threads T]
      [--overwrite]

NAME is one of mimic_cxr, open_i, chexpert_5x200, mimic_5x200, rsna_pneumonia,
siim_pneumothorax, covidx (docs/DATASETS.md gives each one's download and layout). A progress
bar runs per split; the summary lists the examples per split, what the builder held out or
where it read from, and every skipped input with the reason. Output: DATA_DIR/NAME/CONFIG/1.0.0/
with the ArrayRecord files, dataset_info.json, manifest.csv (the split or sample definition),
skipped.csv and fingerprint.json (plus held_out.csv for the 5x200 sets, excluded.csv for
mimic_cxr).

mimic_cxr holds the patients of the MIMIC 5x200 evaluation set out of its train and validation
splits: those of every mimic_5x200 prepared under the same --data-dir (prepare it first), plus
any named with --held-out PATH. With none found it stops and says how to go on; `--held-out
none` pre-trains on every study (docs/DATASETS.md, "Held out of pre-training").

A data set already prepared with the same options by the same code (same fingerprint: format
versions, options, report cleaning rule) is not rebuilt; its summary is read back. One whose
fingerprint differs is refused with the command that rebuilds it (`--overwrite`, which replaces
it; the old files are kept until the new build succeeds). Errors (a wrong or empty manual
directory, a label file with an unknown header or in another encoding than UTF-8, a stale
prepared set) end in one message and exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import shutil
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
  notes: list[str] = dataclasses.field(default_factory=list)

  def format(self) -> str:
    lines = [
      f"{self.name}/{self.config}: {'prepared' if self.built else 'already prepared, reused'} "
      f"at {self.data_path}",
    ]
    for split, n in self.examples.items():
      lines.append(f"  {split}: {n} examples")
    lines += [f"  {note}" for note in self.notes]
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
  seed: int | None = None,
  per_class: int = common.DEFAULT_PER_CLASS,
  held_out: str | Path | Sequence[str | Path] | None = None,
  num_threads: int | None = None,
  overwrite: bool = False,
) -> Summary:
  """Builds data set `name` (once) and returns its summary.

  With `overwrite`, a prepared copy is rebuilt whatever its fingerprint; it is moved aside
  first and put back if the new build fails.

  Args:
    seed: sampling / split seed; None for the builder's default (`DEFAULT_SEED`: 5 for
      siim_pneumothorax, as the paper's code, else 0).
    held_out: mimic_cxr only: further MIMIC 5x200 held-out lists (a prepared mimic_5x200
      folder or its held_out.csv) besides those prepared under `data_dir`, which are always
      held out; or "none" to hold nothing out (`held_out.resolve`).

  Raises:
    KeyError: unknown name. ValueError: bad option. LayoutError: the manual directory does not
    hold the published layout (the message names the file and what was expected).
    StalePreparedError: the prepared copy was made by other code or settings (the message
    gives the command that rebuilds it). HeldOutError: mimic_cxr found nothing to hold out and
    was not told `--held-out none` (the message says how to go on).
  """
  from medunifier_jax import paths
  from medunifier_jax.data.builders import get_builder
  from medunifier_jax.data.builders import held_out as held_out_lib

  manual_dir, data_dir = paths.resolve(manual_dir), paths.resolve(data_dir)
  builder_cls = get_builder(name)
  if class_set is None:
    class_set = next(iter(builder_cls.CLASS_SETS), "")
  default_seed = builder_cls.DEFAULT_SEED
  seed = default_seed if seed is None else seed
  config = common.make_config(image_size, class_set, seed, per_class, default_seed)
  exclusion = None
  if getattr(builder_cls, "EXCLUDES_HELD_OUT", False):
    first = common.rebuild_command(
      held_out_lib.EVAL_SET,
      common.make_config(image_size, "gloria"),
      manual_dir,
      data_dir,
      overwrite=False,
    )
    exclusion = held_out_lib.resolve(held_out, Path(data_dir), first)
  elif held_out:
    raise ValueError(f"--held-out applies to mimic_cxr only, not to {name}")

  def make_builder():
    builder = builder_cls(config=config, data_dir=str(data_dir))
    if exclusion is not None:
      builder.held_out = exclusion
    return builder

  builder = make_builder()
  if _recover(Path(builder.data_dir)):
    builder = make_builder()
  built = overwrite or not builder.is_prepared()
  if built:
    builder_cls.check_manual_dir(manual_dir)  # before the old copy is touched
    _build(make_builder, Path(manual_dir), num_threads, Path(builder.data_dir))
    builder = make_builder()  # re-read what was written
  else:
    builder.check_fingerprint(data_dir, manual_dir)
  return Summary(
    name=name,
    config=config.name,
    data_path=Path(builder.data_dir),
    examples={split: info.num_examples for split, info in sorted(builder.info.splits.items())},
    skipped=builder.skipped,
    built=built,
    notes=builder.notes,
  )


def _aside(target: Path) -> Path:
  """Where an overwrite keeps the previous copy of `target` until the new build succeeds."""
  return target.with_name(f".{target.name}.replaced")


def _recover(target: Path) -> bool:
  """Cleans up after an overwrite that was killed mid-build; True if the old copy came back."""
  aside = _aside(target)
  if not aside.exists():
    return False
  if target.exists():  # the new build finished; only the old copy's removal was missed
    shutil.rmtree(aside)
    return False
  aside.rename(target)
  return True


def _build(make_builder, manual_dir: Path, num_threads, target: Path) -> None:
  """Runs the TFDS build of `make_builder()` into `target` (the version folder), replacing what
  is there only once the new build has succeeded."""
  import tensorflow_datasets as tfds

  aside = _aside(target)
  if target.exists():
    target.rename(aside)
  try:
    builder = make_builder()
    tfds.disable_progress_bar()  # the builders show their own bar per split
    if num_threads:
      builder.num_threads = num_threads
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
  except BaseException:
    if aside.exists():
      shutil.rmtree(target, ignore_errors=True)
      aside.rename(target)
    raise
  shutil.rmtree(aside, ignore_errors=True)


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
  parser.add_argument(
    "--seed",
    type=int,
    default=None,
    help="sampling / split seed (default: the data set's, 5 for siim_pneumothorax as the "
    "paper's code, else 0)",
  )
  parser.add_argument(
    "--per-class", type=int, default=common.DEFAULT_PER_CLASS, help="5x200 sets: images per class"
  )
  parser.add_argument(
    "--held-out",
    action="append",
    default=None,
    metavar="PATH|none",
    help="mimic_cxr: hold the patients of this MIMIC 5x200 set (a prepared mimic_5x200 folder "
    "or its held_out.csv) out of train and validation, besides those prepared under --data-dir, "
    "which are always held out; repeatable. 'none': hold nothing out",
  )
  parser.add_argument(
    "--threads", type=int, default=None, help="image decoding threads (default: min(8, CPUs))"
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="rebuild even if prepared (needed when the prepared copy's fingerprint differs)",
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
      held_out=args.held_out,
      num_threads=args.threads,
      overwrite=args.overwrite,
    )
  except (ValueError, OSError) as e:
    # LayoutError and StalePreparedError are ValueErrors; their messages name the file (and
    # line) or the command to run, which is all a user needs, so no traceback.
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary.format())
  return 0


if __name__ == "__main__":
  sys.exit(main())
