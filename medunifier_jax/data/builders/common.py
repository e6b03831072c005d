"""Shared pieces of the real-data TFDS builders.

Every builder reads a data set's own published layout from a manual download directory and
writes ArrayRecord files of `{"image": uint8 (S, S, 1) PNG, "id": str, ...}`. Images are passed
to TFDS already encoded, so building and reading need no TensorFlow.

What lives here: label-file reading with header, row and encoding checks (`read_csv`,
`read_text`; a damaged row is skipped and listed, a file that is not UTF-8 stops the build with
its line and byte offset), the manual-directory check against each builder's `LAYOUT`, the
fingerprint that ties a prepared data set to the code and settings that made it
(`fingerprint.json`, checked by `prepare` and by the sources), image decoding (files and
DICOM) with a typed `SkipExample` for unusable inputs, resizing to a square canvas (the image
steps are `data/images.py`'s, shared with the input pipeline and the API), the skip
ledger that ends up in the prepared data set's metadata and `skipped.csv`, manifest writing, and
`RadiographBuilder`, the base class that ties them together.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import inspect
import io
import json
import os
import re
import shlex
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm.auto import tqdm

from medunifier_jax.data import images

# CheXpert's 14 observations in the column order of its train.csv; MIMIC-CXR-JPG's label file
# has the same names in another order, so both are stored in this order, mapped by name.
CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
  "No Finding",
  "Enlarged Cardiomediastinum",
  "Cardiomegaly",
  "Lung Opacity",
  "Lung Lesion",
  "Edema",
  "Consolidation",
  "Pneumonia",
  "Atelectasis",
  "Pneumothorax",
  "Pleural Effusion",
  "Pleural Other",
  "Fracture",
  "Support Devices",
)

SKIPPED_FILE = "skipped.csv"
MANIFEST_FILE = "manifest.csv"
FINGERPRINT_FILE = "fingerprint.json"
PREPARE_COMMAND = "python -m medunifier_jax.data.prepare"
# Version of what every builder shares: image decoding, resizing and padding, the record layout.
# Bump it when one of them changes what is stored; each builder has its own FORMAT_VERSION too.
COMMON_FORMAT_VERSION = 1
THREAD_CHUNK = 256  # images decoded ahead of the writer, at most

# TFDS split names for the split labels the published files use.
SPLIT_NAMES = {"train": "train", "validate": "validation", "val": "validation", "test": "test"}


class LayoutError(ValueError):
  """The manual directory does not hold the published layout (wrong header, missing file)."""


class StalePreparedError(ValueError):
  """A prepared data set was made by other code or settings than the running code's; the
  message says what differs and gives the command that rebuilds it."""


class SkipExample(Exception):
  """One input cannot be used (corrupt image, missing file, empty report); the rest goes on.

  Attributes:
    reason: why, in words (goes into the summary and `skipped.csv`).
    path: the offending file.
  """

  def __init__(self, reason: str, path: Path | str):
    super().__init__(f"{path}: {reason}")
    self.reason = reason
    self.path = path


# ---------------------------------------------------------------------------------------------
# Label files


def _open_bytes(path: Path) -> io.BufferedIOBase:
  """Opens `.csv`/`.txt`, `.gz` or a one-member `.zip` (as Kaggle ships them) as bytes."""
  path = Path(path)
  if path.suffix == ".gz":
    return gzip.open(path, "rb")
  if path.suffix == ".zip":
    archive = zipfile.ZipFile(path)
    members = [n for n in archive.namelist() if not n.endswith("/")]
    if len(members) != 1:
      raise LayoutError(f"{path}: expected one file inside the archive, found {members}")
    return archive.open(members[0])
  return open(path, "rb")


def open_text(path: Path) -> io.TextIOBase:
  """Opens `.csv`, `.csv.gz` or a one-member `.zip` as UTF-8 text (a leading BOM is dropped).

  Decoding is lazy: a byte that is not UTF-8 raises UnicodeDecodeError where it is read;
  `not_utf8_error(path)` turns that into a message with the line and byte offset.
  """
  return io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", newline="")


def first_non_utf8(lines: Iterable[bytes]) -> str | None:
  """Where the first byte that is not UTF-8 lies in `lines` (bytes, line ends kept), in words
  ("line 3, byte offset 120: byte 0xe9 in b'...'"); None when all of it is UTF-8.

  Lines are decoded one by one: a UTF-8 sequence never contains the newline byte, so no valid
  character is split between two lines.
  """
  offset = 0
  for number, line in enumerate(lines, 1):
    try:
      line.decode("utf-8")
    except UnicodeDecodeError as e:
      context = line[max(0, e.start - 24) : e.start + 8]
      return (
        f"line {number}, byte offset {offset + e.start}: byte 0x{line[e.start]:02x} in {context!r}"
      )
    offset += len(line)
  return None


def not_utf8_error(path: Path) -> LayoutError:
  """The LayoutError for a label file that does not decode as UTF-8, naming the first bad byte."""
  with _open_bytes(path) as f:
    where = first_non_utf8(f)
  return LayoutError(
    f"{path}: not UTF-8 text ({where or 'undecodable bytes'}). The published file is UTF-8; "
    "another encoding (such as Latin-1) or damage crept in: re-download it, or if it was "
    "edited, save it as UTF-8."
  )


def read_text(path: Path) -> str:
  """A whole text label file (e.g. COVIDx's split lists); LayoutError if it is not UTF-8."""
  path = Path(path)
  if not path.is_file():
    raise LayoutError(f"missing label file {path}; see docs/DATASETS.md for the expected layout")
  try:
    with open_text(path) as f:
      return f.read()
  except UnicodeDecodeError:
    raise not_utf8_error(path) from None


@dataclasses.dataclass(frozen=True)
class BadRow:
  """A label-file row that cannot be used as it is.

  Attributes:
    path: the label file.
    line: its line number (1-based; where the row ends, for rows with quoted line breaks).
    fields: the values it has, keyed by the header's names (possibly fewer than the header).
    reason: what is wrong, in words that are the same for every such row (the summary groups
      skipped inputs by reason).
  """

  path: Path
  line: int
  fields: dict[str, str]
  reason: str


def read_csv(
  path: Path, required: Sequence[str], on_bad_row: Callable[[BadRow], None] | None = None
) -> list[dict[str, str]]:
  """Rows of a published label file as dicts, after checking its header.

  Column names are compared with surrounding spaces removed (SIIM's header is
  `ImageId, EncodedPixels`), and rows are keyed by the stripped names. Blank lines are ignored.
  A row with more or fewer fields than the header (a cut-off line, a stray comma) would pair
  values with the wrong columns, so it is never used: it goes to `on_bad_row` (a builder
  records it as skipped, with file and line), or without one it stops the read.

  Raises:
    LayoutError: the file is missing or lacks one of `required` (the message names the file,
      the expected columns and the ones found); it is not UTF-8 or not readable as CSV (the
      message names the file and line); a bad row without `on_bad_row` (file and line).
  """
  path = Path(path)
  if not path.is_file():
    raise LayoutError(f"missing label file {path}; see docs/DATASETS.md for the expected layout")
  reader = None
  try:
    with open_text(path) as f:
      reader = csv.reader(f)
      header = [name.strip() for name in next(reader, [])]
      missing = [name for name in required if name not in header]
      if missing:
        raise LayoutError(
          f"{path}: unknown layout, expected columns {list(required)} but found {header} "
          f"(missing {missing}). Use the file as published; see docs/DATASETS.md."
        )
      rows = []
      for row in reader:
        if not row:
          continue
        values = [v.strip() for v in row]
        if len(values) == len(header):
          rows.append(dict(zip(header, values)))
          continue
        bad = BadRow(
          path=path,
          line=reader.line_num,
          fields=dict(zip(header, values)),
          reason=(
            f"CSV row with {'fewer' if len(values) < len(header) else 'more'} fields than the "
            "header: fix or delete the line, or re-download the file"
          ),
        )
        if on_bad_row is None:
          raise LayoutError(
            f"{path}:{bad.line}: {bad.reason} ({len(values)} fields, header has "
            f"{len(header)}: {header})"
          )
        on_bad_row(bad)
      return rows
  except UnicodeDecodeError:
    raise not_utf8_error(path) from None
  except csv.Error as e:
    line = reader.line_num if reader is not None else 1
    raise LayoutError(
      f"{path}:{line}: not readable as CSV ({e}); use the file as published (re-download it)"
    ) from None
  except (EOFError, gzip.BadGzipFile, zipfile.BadZipFile, zlib.error) as e:
    raise LayoutError(
      f"{path}: the compressed file is cut off or damaged ({e}); re-download it"
    ) from None


def find_one(root: Path, patterns: Sequence[str], what: str) -> Path:
  """The first file under `root` matching one of the glob `patterns`, else a LayoutError."""
  for pattern in patterns:
    hits = sorted(Path(root).glob(pattern))
    if hits:
      return hits[0]
  raise LayoutError(f"{what}: no file matching {list(patterns)} under {root}; see docs/DATASETS.md")


def chexpert_vector(row: dict[str, str]) -> np.ndarray:
  """CheXpert labels float32 (14,) in `CHEXPERT_OBSERVATIONS` order: 1, 0, -1 or NaN (blank)."""
  out = np.full(len(CHEXPERT_OBSERVATIONS), np.nan, np.float32)
  for i, name in enumerate(CHEXPERT_OBSERVATIONS):
    value = row.get(name, "")
    if value != "":
      out[i] = float(value)
  return out


# ---------------------------------------------------------------------------------------------
# Binary image-level labels (RSNA, SIIM)

SPLITS = ("train", "validation", "test")


def labels_by_key(
  rows: Iterable[dict[str, str]], key: str, positive: Callable[[dict[str, str]], int]
) -> dict[str, int]:
  """`row[key]` -> 1 if any of its rows is `positive`, else 0; sorted by key.

  The label files list one row per finding box or mask, so a key (patient or image) has as many
  rows as it has findings (or one negative row); its label is whether any of them is positive.
  """
  labels: dict[str, int] = {}
  for row in rows:
    labels[row[key]] = max(labels.get(row[key], 0), positive(row))
  return dict(sorted(labels.items()))


def split_of(
  train: Iterable[str], validation: Iterable[str], test: Iterable[str]
) -> dict[str, str]:
  """key -> "train" / "validation" / "test", from the keys drawn into each split."""
  return {key: name for name, keys in zip(SPLITS, (train, validation, test)) for key in keys}


def class_label_features(class_names: Sequence[str]) -> dict[str, Any]:
  """Features of the image-only classification sets: a `label` over `class_names` and a
  `report` (empty; kept so every record has one)."""
  return {
    "label": tfds.features.ClassLabel(names=list(class_names)),
    "report": tfds.features.Text(),
  }


# ---------------------------------------------------------------------------------------------
# Images


def load_image(path: Path, min_side: int | None = None) -> np.ndarray:
  """A JPEG/PNG (or DICOM) radiograph as uint8 (H, W) grayscale; SkipExample if missing or
  unreadable.

  `images.read_gray` (the project's one image reader) with its error turned into a skip. With
  `min_side`, a JPEG is decoded at the smallest of 1, 1/2, 1/4, 1/8 scale that keeps both
  sides >= min_side (faster on large files that are resized to a few hundred pixels anyway).
  """
  path = Path(path)
  try:
    return images.read_gray(path, min_side=min_side)
  except images.ImageReadError as e:
    raise SkipExample(e.reason, path) from None


def _to_gray_uint8(im: Image.Image) -> np.ndarray:
  return images.pil_to_gray(im)


def load_dicom(path: Path) -> np.ndarray:
  """A DICOM radiograph as uint8 (H, W): modality and VOI LUTs applied, MONOCHROME1 inverted.

  `images.read_dicom`; raises SkipExample for a missing or unreadable file and for a file
  without pixel data.
  """
  path = Path(path)
  try:
    return images.read_dicom(path)
  except images.ImageReadError as e:
    raise SkipExample(e.reason, path) from None


def rescale_to_uint8(x: np.ndarray) -> np.ndarray:
  """Min-max scales any-range pixel values to uint8 (a constant image maps to 0);
  `images.rescale_to_uint8`."""
  return images.rescale_to_uint8(x)


def to_square(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W) -> (size, size): aspect kept, centred, black padding; `images.to_square`."""
  return images.to_square(image, size)


def encode_png(image: np.ndarray) -> bytes:
  """uint8 (H, W) -> PNG bytes (what the TFDS Image feature stores, decoded without TF);
  `images.encode_png`."""
  return images.encode_png(image)


# ---------------------------------------------------------------------------------------------
# Reports


def normalize_space(text: str) -> str:
  return re.sub(r"\s+", " ", text or "").strip()


def clean_report(text: str) -> str:
  """A report as stored: cleaned (`medunifier_jax.data.text.clean_report`) but not cut.

  The cut to `config.data.max_words` happens when the report is tokenised, so the stored text
  stays whole and a new word limit needs no rebuild.
  """
  from medunifier_jax.data.text import clean_report as _clean

  return _clean(text, max_words=None)


def read_report(path: Path) -> str:
  """A report file's text; SkipExample if it is missing or not UTF-8.

  A byte that is not UTF-8 is not replaced by a stand-in character: the report would be stored
  altered without a word, so it is skipped, with the line and byte offset in the reason.
  """
  path = Path(path)
  if not path.is_file():
    raise SkipExample("report file missing", path)
  return decode_report(path.read_bytes(), path)


def decode_report(data: bytes, path: Path | str) -> str:
  """A report's bytes (from a file or an archive member at `path`) as text; SkipExample if
  they are not UTF-8 (the reason names line and byte offset), as `read_report`."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    where = first_non_utf8(io.BytesIO(data))
    raise SkipExample(f"report is not UTF-8 text ({where}); save it as UTF-8", path) from None


# ---------------------------------------------------------------------------------------------
# Manifests and skips


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
  path = Path(path)
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow(row)


@dataclasses.dataclass(frozen=True)
class Skipped:
  """One input left out of a prepared data set: its split, file (relative path) and why."""

  split: str
  file: str
  reason: str


# ---------------------------------------------------------------------------------------------
# Builder configuration

_CONFIG_NAME = re.compile(
  r"^(?:(?P<class_set>[a-z_]+?)_)?(?P<size>\d+)px(?:_n(?P<per_class>\d+))?(?:_seed(?P<seed>\d+))?$"
)
DEFAULT_PER_CLASS = 200


@dataclasses.dataclass(eq=False)
class RadiographConfig(tfds.core.BuilderConfig):
  """A builder configuration.

  Attributes:
    image_size: stored images are (image_size, image_size).
    class_set: the class list, where a data set offers several (see `CLASS_SETS`).
    seed: seed of the sampled sets (5x200) and of the splits the builders draw themselves
      (RSNA, SIIM, Open-i, COVIDx validation); sets with an official split ignore it. Each
      builder has its default (`RadiographBuilder.DEFAULT_SEED`).
    per_class: images per class of the sampled sets (5x200).
  """

  image_size: int = 224
  class_set: str = ""
  seed: int = 0
  per_class: int = DEFAULT_PER_CLASS


def config_name(
  image_size: int,
  class_set: str = "",
  seed: int = 0,
  per_class: int = DEFAULT_PER_CLASS,
  default_seed: int = 0,
) -> str:
  """`[CLASSSET_]SIZEpx[_nN][_seedS]`: `224px`, `pneumonia_224px`, `gloria_256px_n100_seed3`.

  The seed is named only when it differs from the builder's `default_seed`, so the plain name
  (`224px`) is always the builder's default protocol (SIIM's default seed is 5, not 0).
  """
  name = f"{image_size}px"
  if class_set:
    name = f"{class_set}_{name}"
  if per_class != DEFAULT_PER_CLASS:
    name = f"{name}_n{per_class}"
  if seed != default_seed:
    name = f"{name}_seed{seed}"
  return name


def make_config(
  image_size: int,
  class_set: str = "",
  seed: int = 0,
  per_class: int = DEFAULT_PER_CLASS,
  default_seed: int = 0,
) -> RadiographConfig:
  """The configuration for these values, named by `config_name` (relative to the builder's
  `default_seed`)."""
  if image_size < 8:
    raise ValueError(f"image_size must be at least 8 px, got {image_size}")
  if per_class < 1:
    raise ValueError(f"per_class must be positive, got {per_class}")
  return RadiographConfig(
    name=config_name(image_size, class_set, seed, per_class, default_seed),
    image_size=image_size,
    class_set=class_set,
    seed=seed,
    per_class=per_class,
    description=f"{image_size}x{image_size} px" + (f", class set {class_set}" if class_set else ""),
  )


class RadiographBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the real-data builders: manual directory, ArrayRecord, square PNG images.

  Subclasses set `name`, `CLASS_SETS` (class set name -> class names, where selectable) or
  `CLASS_NAMES` (fixed classes), `HOMEPAGE`, `MANUAL_DOWNLOAD_INSTRUCTIONS`, and implement
  `_features()`, `_split_generators` and `_generate_examples`. Inside a generator,
  `self._skip(split, path, reason)` records an unusable input; `self._examples(split, items,
  make)` loops with a progress bar and records every SkipExample.

  Any configuration name of the form `config_name(...)` builds (`tfds.builder("mimic_cxr/512px")`,
  `tfds.data_source(...)`), not only the ones listed in BUILDER_CONFIGS.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIG_CLASS = RadiographConfig
  CLASS_SETS: dict[str, tuple[str, ...]] = {}
  CLASS_NAMES: tuple[str, ...] = ()  # fixed classes, for sets without a class-set choice
  num_threads: int = min(8, os.cpu_count() or 1)  # image decoding threads while preparing
  HOMEPAGE = ""
  DESCRIPTION = ""
  # Bump when this builder's code changes what it stores (fields, parsing, selection).
  FORMAT_VERSION = 1
  # The seed when --seed is not given, and the one a configuration name without `_seedS` means.
  DEFAULT_SEED = 0
  # Whether records hold report text cleaned by `data/text.py` (its rule joins the fingerprint).
  STORES_REPORTS = False
  # The published layout, checked before anything is read: one entry per required item, its
  # glob patterns (any one suffices) and what it is, for the message that lists what is missing.
  LAYOUT: tuple[tuple[tuple[str, ...], str], ...] = ()

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    # ArrayRecord: random access for grain, and written without TensorFlow.
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup imports the `importlib_resources` backport for editable installs, which
    # Python >= 3.9 does not need and TFDS does not declare; the class's file is the answer.
    return epath.Path(inspect.getfile(cls))

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "BUILDER_CONFIGS" not in cls.__dict__:
      default_set = next(iter(cls.CLASS_SETS), "")
      seed = cls.DEFAULT_SEED
      cls.BUILDER_CONFIGS = [make_config(224, default_set, seed, default_seed=seed)]

  # -- configuration ---------------------------------------------------------------------------

  def _create_builder_config(self, builder_config, version):
    if isinstance(builder_config, RadiographConfig):
      builder_config = builder_config.name  # the listed instance when the name is listed
    if isinstance(builder_config, str):
      name = builder_config.split(":")[0]
      match = _CONFIG_NAME.match(name)
      if match and self.get_builder_config(name) is None:
        config = make_config(
          int(match["size"]),
          match["class_set"] or "",
          int(match["seed"]) if match["seed"] else self.DEFAULT_SEED,
          int(match["per_class"] or DEFAULT_PER_CLASS),
          default_seed=self.DEFAULT_SEED,
        )
        self._check_class_set(config.class_set)
        return config
    config = super()._create_builder_config(builder_config, version)
    if config is not None:
      self._check_class_set(config.class_set)
    return config

  def _check_class_set(self, class_set: str) -> None:
    if self.CLASS_SETS and class_set not in self.CLASS_SETS:
      raise ValueError(
        f"{self.name}: unknown class set {class_set!r}; choose one of {list(self.CLASS_SETS)}"
      )
    if not self.CLASS_SETS and class_set:
      raise ValueError(f"{self.name} has no selectable class set (got {class_set!r})")

  @property
  def class_names(self) -> tuple[str, ...]:
    """Names of the `label` classes (empty for sets without a class label)."""
    if self.CLASS_SETS:
      return self.CLASS_SETS[self.builder_config.class_set]
    return self.CLASS_NAMES

  # -- info ------------------------------------------------------------------------------------

  def _features(self) -> dict[str, Any]:
    """Features besides `image` and `id`."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    features = {
      "image": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
      "id": tfds.features.Text(),
      **self._features(),
    }
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(features),
      homepage=self.HOMEPAGE,
      metadata=tfds.core.MetadataDict(),
    )

  # -- manual directory ------------------------------------------------------------------------

  @classmethod
  def check_manual_dir(cls, manual_dir: str | Path) -> None:
    """Raises LayoutError unless `manual_dir` holds every item of `LAYOUT`.

    Runs before TFDS looks at the folder (which would only assert that it is not empty), so a
    wrong or empty folder gets one message naming it and listing the files expected there.
    """
    root = Path(manual_dir)
    listing = "\n".join(f"  {' or '.join(patterns):<40} {what}" for patterns, what in cls.LAYOUT)
    expected = (
      f"{cls.name} expects these files there (docs/DATASETS.md, section {cls.name}):\n"
      f"{listing}\n{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}".rstrip()
    )
    if not root.is_dir():
      state = "is a file, not a folder" if root.exists() else "does not exist"
      raise LayoutError(f"--manual-dir {root} {state}. {expected}")
    if next(root.iterdir(), None) is None:
      raise LayoutError(f"--manual-dir {root} is empty. {expected}")
    missing = [
      " or ".join(patterns)
      for patterns, _ in cls.LAYOUT
      if not any(next(root.glob(p), None) is not None for p in patterns)
    ]
    if missing:
      raise LayoutError(f"--manual-dir {root} lacks {', '.join(missing)}. {expected}")

  # -- fingerprint -----------------------------------------------------------------------------

  def _format_versions(self) -> dict[str, int]:
    """The format versions this builder's records depend on (subclasses sharing another
    builder's record code add that one's)."""
    return {self.name: self.FORMAT_VERSION, "common": COMMON_FORMAT_VERSION}

  def fingerprint_parts(self) -> dict[str, Any]:
    """What a prepared data set depends on besides the downloaded files, as plain data: format
    versions, the configuration's options and, for sets with reports, the cleaning rule."""
    cfg = self.builder_config
    parts: dict[str, Any] = {
      "builder": self.name,
      "format_versions": self._format_versions(),
      "options": {
        "image_size": cfg.image_size,
        "class_set": cfg.class_set,
        "seed": cfg.seed,
        "per_class": cfg.per_class,
      },
    }
    if self.STORES_REPORTS:
      from medunifier_jax.data import text as text_lib

      parts["report_cleaning"] = text_lib.cleaning_rule()
    return parts

  def fingerprint(self) -> str:
    """A short hash of `fingerprint_parts()`: equal exactly when the parts are."""
    return _hash_parts(self.fingerprint_parts())

  def rebuild_command(self, manual_dir: str | Path | None, data_dir: str | Path) -> str:
    """The prepare command line that rebuilds this configuration in place."""
    return rebuild_command(
      self.name, self.builder_config, manual_dir, data_dir, default_seed=self.DEFAULT_SEED
    )

  def check_fingerprint(self, data_dir: str | Path, manual_dir: str | Path | None = None) -> None:
    """Raises StalePreparedError unless the prepared files carry this code's fingerprint.

    The message names what differs and the command that rebuilds the set; `manual_dir` goes
    into it, else the folder recorded when the set was prepared.
    """
    path = Path(self.data_dir) / FINGERPRINT_FILE
    try:
      stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
      stored = None
      why = (
        f"has no {FINGERPRINT_FILE}, so it was prepared by an earlier version of this code "
        "(one that, among other things, cut reports to 95 words when storing them)"
      )
    except (OSError, ValueError) as e:
      stored = None
      why = f"has an unreadable {FINGERPRINT_FILE} ({e})"
    if stored is not None and not isinstance(stored, dict):
      stored = None
      why = f"has a {FINGERPRINT_FILE} that is not a JSON object"
    if stored is not None:
      if stored.get("fingerprint") == self.fingerprint():
        return
      changes = _differences(stored.get("parts", {}), self.fingerprint_parts())
      why = f"was prepared by other code or settings ({'; '.join(changes) or 'other hash'})"
    manual = manual_dir or (stored or {}).get("manual_dir")
    raise StalePreparedError(
      f"{self.name}/{self.builder_config.name} at {self.data_dir} {why}; its records may differ "
      "from what preparing it now gives, so it is not used. Rebuild it with:\n"
      f"  {self.rebuild_command(manual, data_dir)}"
    )

  def stored_fingerprint(self) -> dict[str, Any]:
    """The prepared set's `fingerprint.json` as a dict ({} when it is missing or unreadable)."""
    try:
      stored = json.loads((Path(self.data_dir) / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
      return {}
    return stored if isinstance(stored, dict) else {}

  def _fingerprint_record(self) -> dict[str, Any]:
    """What `fingerprint.json` keeps besides the hashed parts: facts of this build that do not
    decide its records' content, such as the folders it read (subclasses add theirs)."""
    manual = getattr(self, "_manual_root", None)
    return {"manual_dir": str(Path(manual).resolve()) if manual is not None else None}

  def _write_fingerprint(self) -> None:
    """Writes `fingerprint.json` next to the ArrayRecord files (in TFDS's temporary folder,
    renamed with the rest on success)."""
    record = {
      "fingerprint": self.fingerprint(),
      "parts": self.fingerprint_parts(),
      **self._fingerprint_record(),
    }
    (Path(self.data_dir) / FINGERPRINT_FILE).write_text(
      json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )

  # -- generation helpers ----------------------------------------------------------------------

  @property
  def notes(self) -> list[str]:
    """Lines the builder adds to the prepare summary (what it held out, where it read from),
    as stored with the prepared data set."""
    return list(self.info.metadata.get("notes", [])) if self.info.metadata is not None else []

  def _note(self, line: str) -> None:
    self.info.metadata.setdefault("notes", []).append(line)

  @property
  def skipped(self) -> list[Skipped]:
    """Inputs left out, as stored with the prepared data set (empty before preparing)."""
    rows = self.info.metadata.get("skipped", []) if self.info.metadata is not None else []
    return [Skipped(*row) for row in rows]

  def _skip(self, split: str, path: Path | str, reason: str) -> None:
    manual = getattr(self, "_manual_root", None)
    file = str(path)
    if manual is not None:
      try:
        file = os.path.relpath(path, manual)
      except ValueError:
        pass
    self.info.metadata.setdefault("skipped", []).append([split, file, reason])

  def _bad_row(self, bad: BadRow) -> None:
    """`read_csv`'s `on_bad_row` for builders: the row is skipped and listed as FILE:LINE."""
    self._skip("all", f"{bad.path}:{bad.line}", bad.reason)

  def _download_and_prepare(self, dl_manager, download_config=None):
    manual_dir = getattr(download_config, "manual_dir", None)
    if manual_dir:
      self.check_manual_dir(manual_dir)  # before TFDS's own, less telling, check
    self.info.metadata["skipped"] = []
    self.info.metadata["notes"] = []
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    # self.data_dir is still the temporary directory TFDS renames on success.
    write_csv(
      Path(self.data_dir) / SKIPPED_FILE,
      ("split", "file", "reason"),
      (dict(split=s, file=f, reason=r) for s, f, r in self.info.metadata["skipped"]),
    )
    self._write_fingerprint()

  def _manual(self, dl_manager) -> Path:
    self._manual_root = Path(dl_manager.manual_dir)
    return self._manual_root

  def _examples(
    self, split: str, items: Sequence[Any], make: Callable[[Any], tuple[str, dict]]
  ) -> Iterator[tuple[str, dict]]:
    """Yields `make(item)` -> (key, example) for each item with a progress bar; an item whose
    `make` raises SkipExample is recorded in the skip ledger and left out."""

    def attempt(item):
      try:
        return make(item), None
      except SkipExample as e:
        return None, e

    made = 0
    progress = tqdm(total=len(items), desc=f"{self.name} {split}", unit="img", leave=False)
    # Decoding and resizing run in threads (PIL and pydicom release the GIL); chunks keep the
    # results in input order and bound the memory held ahead of the writer.
    with ThreadPoolExecutor(max_workers=self.num_threads) as pool, progress:
      for start in range(0, len(items), THREAD_CHUNK):
        for result, skip in pool.map(attempt, items[start : start + THREAD_CHUNK]):
          progress.update()
          if skip is not None:
            self._skip(split, skip.path, skip.reason)
          else:
            made += 1
            yield result
    if not made:  # TFDS cannot write an empty split; say why instead
      reasons = sorted({s[2] for s in self.info.metadata["skipped"] if s[0] == split})
      hint = self._empty_split_hint(items)
      raise LayoutError(
        f"{self.name}: split {split!r} has no usable example ({len(items)} listed, all skipped: "
        f"{reasons or 'none listed'}); " + (hint or "check --manual-dir against docs/DATASETS.md")
      )

  def _empty_split_hint(self, items: Sequence[Any]) -> str:
    """Where the inputs of a split were looked for and what was expected there, for the error
    when every one of them was skipped ('' for the generic advice)."""
    return ""

  def _load_image(self, path: Path) -> np.ndarray:
    """`load_image` with JPEG decoding scaled down towards the stored size."""
    return load_image(path, min_side=self.builder_config.image_size)

  def _image(self, array: np.ndarray) -> bytes:
    """uint8 (H, W) -> PNG bytes of the configured square size."""
    size = self.builder_config.image_size
    return encode_png(to_square(array, size))

  def _write_manifest(self, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Writes `manifest.csv` next to the ArrayRecord files (the split/sample definition)."""
    write_csv(Path(self.data_dir) / MANIFEST_FILE, columns, rows)

  def _keyed_splits(
    self,
    root: Path,
    key_column: str,
    labels: dict[str, int],
    split: dict[str, str],
    item: Callable[[str, int], Any] = lambda key, label: (key, label),
  ) -> dict[str, Iterator[tuple[str, dict]]]:
    """Writes the manifest (key_column, label, split) and returns the generator of each split,
    for the sets that label and split one key (patient or image) at a time.

    Args:
      labels: key -> class index, in manifest order.
      split: key -> "train" / "validation" / "test".
      item: (key, label) -> what `_generate_examples(root, split, items)` makes an example of.
    """
    self._write_manifest(
      (key_column, "label", "split"),
      ({key_column: k, "label": y, "split": split[k]} for k, y in labels.items()),
    )
    return {
      name: self._generate_examples(
        root, name, [item(k, y) for k, y in labels.items() if split[k] == name]
      )
      for name in SPLITS
    }


# ---------------------------------------------------------------------------------------------
# Fingerprints


def _hash_parts(parts: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(parts: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(parts, dict):
    out: dict[str, Any] = {}
    for key, value in parts.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix.rstrip("."): parts}


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'key: prepared with A, now B' for each leaf of two fingerprint part trees that differs."""
  old, new = _flatten(stored), _flatten(current)

  def show(leaves: dict[str, Any], key: str) -> str:
    return repr(leaves[key]) if key in leaves else "nothing"

  return [
    f"{key}: prepared with {show(old, key)}, now {show(new, key)}"
    for key in sorted(set(old) | set(new))
    if key not in old or key not in new or old[key] != new[key]
  ]


def rebuild_command(
  name: str,
  config: RadiographConfig,
  manual_dir: str | Path | None,
  data_dir: str | Path,
  *,
  default_seed: int = 0,
  extra_args: Sequence[str] = (),
  overwrite: bool = True,
) -> str:
  """The prepare command that rebuilds `name` in `config` over what is there (`--overwrite`).

  Options at their defaults are left out (the seed compared with the builder's
  `default_seed`); `extra_args` are a builder's own options (mimic_cxr's `--held-out`). A
  manual directory that is not known is written MANUAL_DIR (the folder holding the downloaded
  files). Without `overwrite`, the command that prepares it for the first time.
  """
  args = [
    PREPARE_COMMAND,
    name,
    "--manual-dir",
    shlex.quote(str(manual_dir)) if manual_dir else "MANUAL_DIR",
    "--data-dir",
    shlex.quote(str(data_dir)),
    "--image-size",
    str(config.image_size),
  ]
  if config.class_set:
    args += ["--class-set", config.class_set]
  if config.seed != default_seed:
    args += ["--seed", str(config.seed)]
  if config.per_class != DEFAULT_PER_CLASS:
    args += ["--per-class", str(config.per_class)]
  args += [shlex.quote(str(a)) for a in extra_args]
  return " ".join([*args, "--overwrite"] if overwrite else args)
