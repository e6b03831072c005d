"""Shared pieces of the real-data TFDS builders.

Every builder reads a data set's own published layout from a manual download directory and
writes ArrayRecord files of `{"image": uint8 (S, S, 1) PNG, "id": str, ...}`. Images are passed
to TFDS already encoded, so building and reading need no TensorFlow.

What lives here: label-file reading with header checks (`read_csv`), image decoding (files and
DICOM) with a typed `SkipExample` for unusable inputs, resizing to a square canvas, the skip
ledger that ends up in the prepared data set's metadata and `skipped.csv`, manifest writing, and
`RadiographBuilder`, the base class that ties them together.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import inspect
import io
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm.auto import tqdm

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
THREAD_CHUNK = 256  # images decoded ahead of the writer, at most

# TFDS split names for the split labels the published files use.
SPLIT_NAMES = {"train": "train", "validate": "validation", "val": "validation", "test": "test"}


class LayoutError(ValueError):
  """The manual directory does not hold the published layout (wrong header, missing file)."""


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


def open_text(path: Path) -> io.TextIOBase:
  """Opens `.csv`, `.csv.gz` or a one-member `.zip` (as Kaggle ships them) as text."""
  path = Path(path)
  if path.suffix == ".gz":
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
  if path.suffix == ".zip":
    archive = zipfile.ZipFile(path)
    members = [n for n in archive.namelist() if not n.endswith("/")]
    if len(members) != 1:
      raise LayoutError(f"{path}: expected one file inside the archive, found {members}")
    return io.TextIOWrapper(archive.open(members[0]), encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
  """Rows of a published label file as dicts, after checking its header.

  Column names are compared with surrounding spaces removed (SIIM's header is
  `ImageId, EncodedPixels`), and rows are keyed by the stripped names.

  Raises:
    LayoutError: the file is missing or lacks one of `required`; the message names the file,
      the expected columns and the ones found.
  """
  path = Path(path)
  if not path.is_file():
    raise LayoutError(f"missing label file {path}; see docs/DATASETS.md for the expected layout")
  with open_text(path) as f:
    reader = csv.reader(f)
    header = [name.strip() for name in next(reader, [])]
    missing = [name for name in required if name not in header]
    if missing:
      raise LayoutError(
        f"{path}: unknown layout, expected columns {list(required)} but found {header} "
        f"(missing {missing}). Use the file as published; see docs/DATASETS.md."
      )
    return [dict(zip(header, (v.strip() for v in row))) for row in reader if row]


def find_one(root: Path, patterns: Sequence[str], what: str) -> Path:
  """The first file under `root` matching one of the glob `patterns`, else a LayoutError."""
  for pattern in patterns:
    hits = sorted(Path(root).glob(pattern))
    if hits:
      return hits[0]
  raise LayoutError(
    f"{what}: no file matching {list(patterns)} under {root}; see docs/DATASETS.md"
  )


def chexpert_vector(row: dict[str, str]) -> np.ndarray:
  """CheXpert labels float32 (14,) in `CHEXPERT_OBSERVATIONS` order: 1, 0, -1 or NaN (blank)."""
  out = np.full(len(CHEXPERT_OBSERVATIONS), np.nan, np.float32)
  for i, name in enumerate(CHEXPERT_OBSERVATIONS):
    value = row.get(name, "")
    if value != "":
      out[i] = float(value)
  return out


# ---------------------------------------------------------------------------------------------
# Images


def load_image(path: Path, min_side: int | None = None) -> np.ndarray:
  """A JPEG/PNG radiograph as uint8 (H, W) grayscale; SkipExample if missing or unreadable.

  With `min_side`, a JPEG is decoded at the smallest of 1, 1/2, 1/4, 1/8 scale that keeps both
  sides >= min_side (libjpeg's DCT scaling): about 2.5x faster on 2544x3056 MIMIC-CXR-sized
  files that are resized to a few hundred pixels anyway.
  """
  path = Path(path)
  if not path.is_file():
    raise SkipExample("image file missing", path)
  try:
    with Image.open(path) as im:
      if min_side and im.format == "JPEG":
        im.draft("L", (min_side, min_side))
      im.load()  # decodes now, so a truncated file fails here, not later
      return _to_gray_uint8(im)
  except (OSError, SyntaxError, ValueError) as e:
    raise SkipExample(f"corrupt or truncated image ({e})", path) from None


def _to_gray_uint8(im: Image.Image) -> np.ndarray:
  if im.mode in ("I;16", "I;16B", "I", "F"):
    return rescale_to_uint8(np.asarray(im, np.float32))
  return np.asarray(im.convert("L"), np.uint8)


def load_dicom(path: Path) -> np.ndarray:
  """A DICOM radiograph as uint8 (H, W): modality and VOI LUTs applied, MONOCHROME1 inverted.

  Raises SkipExample for a missing or unreadable file and for a file without pixel data.
  """
  import pydicom
  from pydicom.pixels import apply_modality_lut, apply_voi_lut

  path = Path(path)
  if not path.is_file():
    raise SkipExample("DICOM file missing", path)
  try:
    ds = pydicom.dcmread(path)
  except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as e:
    raise SkipExample(f"not a readable DICOM file ({e})", path) from None
  if "PixelData" not in ds:
    raise SkipExample("DICOM has no pixel data", path)
  try:
    pixels = ds.pixel_array
  except Exception as e:  # pydicom raises many types for broken pixel data
    raise SkipExample(f"DICOM pixel data cannot be decoded ({e})", path) from None
  if pixels.ndim != 2:
    raise SkipExample(f"expected one grayscale frame, got pixels of shape {pixels.shape}", path)
  if pixels.dtype == np.uint8 and "WindowCenter" not in ds and "RescaleSlope" not in ds:
    image = pixels
  else:
    image = rescale_to_uint8(apply_voi_lut(apply_modality_lut(pixels, ds), ds))
  if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
    image = 255 - image
  return np.asarray(image, np.uint8)


def rescale_to_uint8(x: np.ndarray) -> np.ndarray:
  """Min-max scales any-range pixel values to uint8 (a constant image maps to 0)."""
  x = np.asarray(x, np.float32)
  lo, hi = float(x.min()), float(x.max())
  if hi <= lo:
    return np.zeros(x.shape, np.uint8)
  return np.round((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_square(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 (H, W) so the longer side is `size`, then pads to (size, size) with black.

  Keeping the aspect ratio (as GLoRIA and MGCA do) keeps the whole chest in view.
  """
  h, w = image.shape
  scale = size / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  resized = Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
  canvas = np.zeros((size, size), np.uint8)
  top, left = (size - nh) // 2, (size - nw) // 2
  canvas[top : top + nh, left : left + nw] = np.asarray(resized)
  return canvas


def encode_png(image: np.ndarray) -> bytes:
  """uint8 (H, W) -> PNG bytes (what the TFDS Image feature stores, decoded without TF)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Reports


def normalize_space(text: str) -> str:
  return re.sub(r"\s+", " ", text or "").strip()


def clean_report(text: str) -> str:
  """The project's report cleaning (`medunifier_jax.data.text.clean_report`)."""
  from medunifier_jax.data.text import clean_report as _clean

  return _clean(text)


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
    seed: seed of the sampled sets (5x200); the fixed splits ignore it.
    per_class: images per class of the sampled sets (5x200).
  """

  image_size: int = 224
  class_set: str = ""
  seed: int = 0
  per_class: int = DEFAULT_PER_CLASS


def config_name(
  image_size: int, class_set: str = "", seed: int = 0, per_class: int = DEFAULT_PER_CLASS
) -> str:
  """`[CLASSSET_]SIZEpx[_nN][_seedS]`: `224px`, `pneumonia_224px`, `gloria_256px_n100_seed3`."""
  name = f"{image_size}px"
  if class_set:
    name = f"{class_set}_{name}"
  if per_class != DEFAULT_PER_CLASS:
    name = f"{name}_n{per_class}"
  if seed:
    name = f"{name}_seed{seed}"
  return name


def make_config(
  image_size: int, class_set: str = "", seed: int = 0, per_class: int = DEFAULT_PER_CLASS
) -> RadiographConfig:
  """The configuration for these values, named by `config_name`."""
  if image_size < 8:
    raise ValueError(f"image_size must be at least 8 px, got {image_size}")
  if per_class < 1:
    raise ValueError(f"per_class must be positive, got {per_class}")
  return RadiographConfig(
    name=config_name(image_size, class_set, seed, per_class),
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
      cls.BUILDER_CONFIGS = [make_config(224, default_set)]

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
          int(match["seed"] or 0),
          int(match["per_class"] or DEFAULT_PER_CLASS),
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

  # -- generation helpers ----------------------------------------------------------------------

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

  def _download_and_prepare(self, dl_manager, download_config=None):
    self.info.metadata["skipped"] = []
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    # self.data_dir is still the temporary directory TFDS renames on success.
    write_csv(
      Path(self.data_dir) / SKIPPED_FILE,
      ("split", "file", "reason"),
      (dict(split=s, file=f, reason=r) for s, f, r in self.info.metadata["skipped"]),
    )

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
      raise LayoutError(
        f"{self.name}: split {split!r} has no usable example ({len(items)} listed, all skipped: "
        f"{reasons or 'none listed'}); check --manual-dir against docs/DATASETS.md"
      )

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
