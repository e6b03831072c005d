"""Preparing a real data set, as a library: what `python -m medunifier_jax.data.prepare` runs.

`prepare` builds one data set's ArrayRecord files (once: a copy prepared with the same options
by the same code is reused, one whose fingerprint differs is refused) and returns a `Summary`.
The command line lives here too, as flags any `absl.flags.FlagValues` can hold
(`define_flags`): the program defines them on the global flags, and `run_command` parses an
argument list into fresh ones, so the tests and a printed rebuild command run exactly what a
user types, in-process and any number of times.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import flags

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
      f"at {self.data_path}"
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


@dataclasses.dataclass(frozen=True)
class CommandFlags:
  """The options of the prepare command, as the flags that hold them once parsed."""

  manual_dir: flags.FlagHolder
  data_dir: flags.FlagHolder
  image_size: flags.FlagHolder
  class_set: flags.FlagHolder
  seed: flags.FlagHolder
  per_class: flags.FlagHolder
  held_out: flags.FlagHolder
  threads: flags.FlagHolder
  overwrite: flags.FlagHolder

  def prepare_args(self) -> dict:
    """The parsed values as `prepare`'s keyword arguments (all but the name)."""
    return dict(
      manual_dir=self.manual_dir.value,
      data_dir=self.data_dir.value,
      image_size=self.image_size.value,
      class_set=self.class_set.value,
      seed=self.seed.value,
      per_class=self.per_class.value,
      held_out=self.held_out.value,
      num_threads=self.threads.value,
      overwrite=self.overwrite.value,
    )


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> CommandFlags:
  """Defines the command's flags in `flag_values`.

  The names keep the documented hyphenated spellings (`--manual-dir DIR`): absl accepts
  hyphens in flag names, and the rebuild commands that refusals print (`common.rebuild_command`)
  and docs/DATASETS.md use them.
  """
  fv = dict(flag_values=flag_values)
  options = CommandFlags(
    manual_dir=flags.DEFINE_string("manual-dir", None, "The downloaded files, as published.", **fv),
    data_dir=flags.DEFINE_string("data-dir", None, "Where the prepared data set goes.", **fv),
    image_size=flags.DEFINE_integer("image-size", 224, "Stored image side (px).", **fv),
    class_set=flags.DEFINE_string(
      "class-set",
      None,
      "chexpert_5x200/mimic_5x200: gloria | pneumonia; covidx: three_class | binary.",
      **fv,
    ),
    seed=flags.DEFINE_integer(
      "seed",
      None,
      "Sampling / split seed (default: the data set's, 5 for siim_pneumothorax "
      "as the paper's code, else 0).",
      **fv,
    ),
    per_class=flags.DEFINE_integer(
      "per-class", common.DEFAULT_PER_CLASS, "5x200 sets: images per class.", **fv
    ),
    held_out=flags.DEFINE_multi_string(
      "held-out",
      None,
      "PATH|none. mimic_cxr: hold the patients of this MIMIC 5x200 set (a "
      "prepared mimic_5x200 folder or its held_out.csv) out of train and validation, besides "
      "those prepared under --data-dir, which are always held out; repeatable. 'none': hold "
      "nothing out.",
      **fv,
    ),
    threads=flags.DEFINE_integer(
      "threads", None, "Image decoding threads (default: min(8, CPUs)).", **fv
    ),
    overwrite=flags.DEFINE_bool(
      "overwrite",
      False,
      "Rebuild even if prepared (needed when the prepared copy's fingerprint differs).",
      **fv,
    ),
  )
  flags.mark_flags_as_required(["manual-dir", "data-dir"], **fv)
  return options


def run(args: Sequence[str], options: CommandFlags) -> int:
  """The command once its flags are parsed: `args` is the rest of the command line, the data
  set name. Prints the summary (or one error line) and returns the exit status, 0 or 2."""
  from medunifier_jax.data.builders import BUILDERS

  if len(args) != 1 or args[0] not in BUILDERS:
    # The positional name is not an absl flag, so it is checked here.
    print(
      f"error: give one data set name, one of {', '.join(sorted(BUILDERS))}; got "
      f"{' '.join(args) or 'none'}",
      file=sys.stderr,
    )
    return 2
  logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's notes on custom configurations
  try:
    summary = prepare(args[0], **options.prepare_args())
  except (ValueError, OSError) as e:
    # LayoutError and StalePreparedError are ValueErrors; their messages name the file (and
    # line) or the command to run, which is all a user needs, so no traceback.
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary.format())
  return 0


def run_command(args: Sequence[str | Path]) -> int:
  """`python -m medunifier_jax.data.prepare ARGS` in this process; returns its exit status.

  The flags are fresh each call (absl flags are defined once per `FlagValues`), so this runs
  any number of times beside the program's own flags.
  """
  flag_values = flags.FlagValues()
  options = define_flags(flag_values)
  try:
    rest = flag_values([common.PREPARE_COMMAND, *map(str, args)])
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return run(rest[1:], options)
