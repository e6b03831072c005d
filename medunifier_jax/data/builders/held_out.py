"""Patients held out of MIMIC-CXR pre-training because the MIMIC 5x200 evaluation set holds them.

MIMIC 5x200 draws its studies from every official MIMIC-CXR split, train included (as the
published sets did). A model pre-trained on those studies would be scored, in zero-shot
classification and retrieval, on image-report pairs it has seen. So:

- `mimic_5x200` writes the studies it holds to `held_out.csv` next to its manifest
  (`subject_id, study_id, dicom_id, path, split`: every drawn study, also one skipped for a bad
  file; the file depends on the label tables only);
- `mimic_cxr` leaves out of its train and validation splits every study of every patient named
  there. Whole patients, not only the drawn studies: a patient's other studies show the same
  body, devices and often the same findings in the same words, so they would leak too. The
  official test split is kept whole: nothing is trained on it, and it is the report-generation
  benchmark's definition.

Where the held-out sets come from (`resolve`): every prepared `mimic_5x200` configuration under
the `--data-dir` that `mimic_cxr` is prepared into (always searched), plus the ones named with
`--held-out PATH`. When there is none, preparing `mimic_cxr` stops and says how to go on
(prepare `mimic_5x200` first, name one, or `--held-out none` to hold nothing out): leakage never
happens by forgetting an option. The sets used are part of `mimic_cxr`'s fingerprint; reading a
prepared `mimic_cxr` is refused when a `mimic_5x200` set under the same data directory is not
among them (prepared later), with the command that rebuilds it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medunifier_jax.data.builders import common

HELD_OUT_FILE = "held_out.csv"
EXCLUDED_FILE = "excluded.csv"
EVAL_SET = "mimic_5x200"  # the builder whose held_out.csv mimic_cxr reads
COLUMNS = ("subject_id", "study_id", "dicom_id", "path", "split")
REQUIRED = ("subject_id", "study_id", "dicom_id")  # a CheXpert held_out.csv lacks dicom_id
UNIT = "patient"
# The splits the held-out patients leave (TFDS names; the split table says `validate`).
EXCLUDED_SPLITS = ("train", "validation")
NONE = "none"  # the --held-out value that holds nothing out


class HeldOutError(ValueError):
  """What mimic_cxr should hold out cannot be settled (none found, a named file is missing or
  not a MIMIC 5x200 held-out list); the message says how to go on."""


def write(path: Path, rows: Iterable[dict[str, Any]]) -> None:
  """Writes a held-out list (`COLUMNS`) at `path`, one row per study."""
  common.write_csv(path, COLUMNS, rows)


@dataclasses.dataclass(frozen=True)
class HeldOutSet:
  """One MIMIC 5x200 held-out list.

  Attributes:
    label: `mimic_5x200/CONFIG` for a list inside a prepared set, else its folder/file name.
    path: the held_out.csv file.
    studies: its (subject_id, study_id) pairs.
    digest: a short hash of the sorted pairs: equal exactly when the studies are, wherever
      the file lies.
  """

  label: str
  path: Path
  studies: frozenset[tuple[str, str]]
  digest: str

  @property
  def subjects(self) -> frozenset[str]:
    return frozenset(subject for subject, _ in self.studies)

  @property
  def key(self) -> str:
    """`label:digest`, as the fingerprint lists it."""
    return f"{self.label}:{self.digest}"


def _label(path: Path) -> str:
  parts = path.parts
  if EVAL_SET in parts[:-1]:
    i = len(parts) - 1 - parts[::-1].index(EVAL_SET)
    if i + 1 < len(parts) - 1:
      return f"{EVAL_SET}/{parts[i + 1]}"
  return f"{path.parent.name}/{path.name}"


def read(path: Path) -> HeldOutSet:
  """A held-out list; HeldOutError if it is not one of MIMIC 5x200 (header checked)."""
  path = Path(path)
  try:
    rows = common.read_csv(path, REQUIRED)
  except common.LayoutError as e:
    raise HeldOutError(
      f"--held-out {path}: not a MIMIC 5x200 held-out list ({e}); it is the held_out.csv "
      f"that `prepare {EVAL_SET}` writes"
    ) from None
  studies = frozenset((r["subject_id"], r["study_id"]) for r in rows)
  digest = hashlib.sha256(repr(sorted(studies)).encode()).hexdigest()[:12]
  return HeldOutSet(label=_label(path), path=path, studies=studies, digest=digest)


def _version_dir() -> str:
  return str(common.RadiographBuilder.VERSION)


def find_prepared(data_dir: Path) -> tuple[list[Path], list[Path]]:
  """(held_out.csv files, prepared folders without one) of the `mimic_5x200` configurations
  prepared under `data_dir` (DATA_DIR/mimic_5x200/CONFIG/1.0.0 with a dataset_info.json;
  builds in progress and copies set aside by --overwrite do not count)."""
  files, lacking = [], []
  for folder in sorted(Path(data_dir).glob(f"{EVAL_SET}/*/{_version_dir()}")):
    if not (folder / "dataset_info.json").is_file():
      continue
    (files if (folder / HELD_OUT_FILE).is_file() else lacking).append(folder / HELD_OUT_FILE)
  return files, [f.parent for f in lacking]


def _named(path: Path) -> list[Path]:
  """The held-out lists a --held-out PATH names: the file, a prepared folder's list, or every
  prepared mimic_5x200 list below a folder (DATA_DIR, DATA_DIR/mimic_5x200, ...)."""
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise HeldOutError(f"--held-out {path} does not exist")
  if (path / HELD_OUT_FILE).is_file():
    return [path / HELD_OUT_FILE]
  found = [
    p
    for p in sorted(path.rglob(HELD_OUT_FILE))
    if EVAL_SET in p.relative_to(path.parent).parts
    and p.parent.name == _version_dir()
    and (p.parent / "dataset_info.json").is_file()
  ]
  if not found:
    raise HeldOutError(
      f"--held-out {path}: no {HELD_OUT_FILE} there; name a prepared {EVAL_SET} folder "
      f"(DATA_DIR/{EVAL_SET}/CONFIG/{_version_dir()}, or a folder above it) or its "
      f"{HELD_OUT_FILE}"
    )
  return found


@dataclasses.dataclass(frozen=True)
class Exclusion:
  """What mimic_cxr holds out of pre-training.

  Attributes:
    named: the --held-out values as given (resolved paths), or `(NONE,)`; the held-out sets
      prepared under the data directory are searched in any case.
    sets: the held-out lists used (empty only with `--held-out none`).
  """

  named: tuple[str, ...]
  sets: tuple[HeldOutSet, ...]

  @property
  def disabled(self) -> bool:
    return self.named == (NONE,)

  # Computed once: `excludes` runs for every image of the label tables.
  @functools.cached_property
  def subjects(self) -> frozenset[str]:
    return frozenset().union(*(s.subjects for s in self.sets))

  @functools.cached_property
  def studies(self) -> frozenset[tuple[str, str]]:
    return frozenset().union(*(s.studies for s in self.sets))

  def excludes(self, subject_id: str, split: str) -> bool:
    """Whether an image of this patient in this official split (as the split table names it)
    is left out."""
    return common.SPLIT_NAMES.get(split) in EXCLUDED_SPLITS and subject_id in self.subjects

  def part(self) -> Any:
    """The fingerprint part: what is held out, by content (not by where the files lie)."""
    if self.disabled:
      return NONE
    return {"unit": UNIT, "splits": list(EXCLUDED_SPLITS), "sets": sorted(s.key for s in self.sets)}

  def args(self) -> list[str]:
    """The prepare options that give this exclusion again (for the rebuild command)."""
    return [arg for value in self.named for arg in ("--held-out", value)]

  def describe(self) -> str:
    """The held-out sets in words, for the summary."""
    if self.disabled:
      return "nothing (--held-out none)"
    sets = ", ".join(s.label for s in self.sets)
    return f"{sets} ({len(self.studies)} studies of {len(self.subjects)} patients)"


def named_values(held_out: str | Path | Sequence[str | Path] | None) -> tuple[str, ...]:
  """--held-out values as a tuple of strings ('none' alone, or paths)."""
  if held_out is None:
    return ()
  values = [held_out] if isinstance(held_out, (str, Path)) else list(held_out)
  values = [str(v) for v in values]
  if NONE in values and len(values) > 1:
    raise HeldOutError(f"--held-out {NONE} holds nothing out; it cannot go with paths {values}")
  return tuple(values)


def resolve(
  held_out: str | Path | Sequence[str | Path] | None, data_dir: Path, prepare_first: str
) -> Exclusion:
  """The exclusion for `prepare mimic_cxr`: the held-out sets prepared under `data_dir` plus
  the named ones, or nothing with `none`.

  Args:
    held_out: --held-out values (None or [] for none given).
    data_dir: the --data-dir mimic_cxr is prepared into.
    prepare_first: the command that prepares mimic_5x200 there (for the message when none is
      found).

  Raises:
    HeldOutError: no held-out set found and none named; a named path holds none or is not a
      MIMIC 5x200 list; a mimic_5x200 prepared under data_dir lacks its list (prepared by an
      earlier version; the message gives the rebuild command).
  """
  named = named_values(held_out)
  if named == (NONE,):
    return Exclusion(named=named, sets=())
  data_dir = Path(data_dir)
  files, lacking = find_prepared(data_dir)
  if lacking:
    raise HeldOutError(
      f"{EVAL_SET} prepared at {', '.join(map(str, lacking))} has no {HELD_OUT_FILE} (it was "
      f"prepared by an earlier version of this code), so mimic_cxr cannot hold its patients out "
      f"of pre-training. Rebuild it first:\n  {_rebuild_eval_set(lacking[0], data_dir)}"
    )
  named = tuple(str(Path(v).resolve()) for v in named)
  for value in named:
    files += _named(Path(value))
  unique = {}
  for path in files:
    unique.setdefault(path.resolve(), path)
  sets = tuple(read(p) for p in unique.values())
  if not sets:
    raise HeldOutError(
      f"mimic_cxr: no prepared {EVAL_SET} under --data-dir {data_dir} (looked for "
      f"{data_dir / EVAL_SET}/*/{_version_dir()}/{HELD_OUT_FILE}) and no --held-out given, so "
      f"nothing would be held out of pre-training and MIMIC 5x200 zero-shot classification "
      f"and retrieval would score studies the model trained on. Either\n"
      f"  prepare {EVAL_SET} first, into the same --data-dir:\n    {prepare_first}\n"
      f"  or name one prepared elsewhere: --held-out PATH (its folder or its {HELD_OUT_FILE})\n"
      f"  or hold nothing out (no MIMIC 5x200 evaluation of this model): --held-out {NONE}"
    )
  return Exclusion(named=named, sets=sets)


def _rebuild_eval_set(folder: Path, data_dir: Path) -> str:
  """The command that rebuilds the mimic_5x200 configuration prepared in `folder`."""
  import json

  from medunifier_jax.data.builders.mimic_5x200 import Mimic5x200

  try:
    stored = json.loads((folder / common.FINGERPRINT_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    stored = {}
  manual = stored.get("manual_dir") if isinstance(stored, dict) else None
  config = Mimic5x200(config=folder.parent.name, data_dir=str(data_dir)).builder_config
  return common.rebuild_command(
    EVAL_SET, config, manual, data_dir, default_seed=Mimic5x200.DEFAULT_SEED
  )


def uncovered(stored_part: Any, data_dir: Path) -> list[HeldOutSet]:
  """The held-out sets prepared under `data_dir` that a mimic_cxr built with fingerprint part
  `stored_part` does not hold out (nothing when it was built with `--held-out none`: the user
  chose that)."""
  if stored_part == NONE or not isinstance(stored_part, dict):
    return []
  covered = {key.rsplit(":", 1)[-1] for key in stored_part.get("sets", [])}
  files, _ = find_prepared(data_dir)
  return [s for s in map(read, files) if s.digest not in covered]


EXCLUDED_COLUMNS = ("dicom_id", "subject_id", "study_id", "split", "held_out_by")


def write_excluded(path: Path, rows: Iterable[dict[str, Any]]) -> None:
  """Writes mimic_cxr's `excluded.csv`: the images left out, with the held-out list that named
  their patient (`EXCLUDED_COLUMNS`)."""
  common.write_csv(path, EXCLUDED_COLUMNS, rows)
