"""Reading radiographs and turning them into model input: the one place that does either.

Three paths meet here and agree pixel for pixel:

- the data set builders (`data/builders/`) read a published file (`read_gray`), fit it into
  the stored square (`to_square`) and store it as PNG (`encode_png`);
- the input pipeline (`data/pipeline.py`) turns a stored record into the model's image
  (`unit_image`, then `gray_to_rgb` / `normalize`);
- the inference API (`api.Model.preprocess_images`) turns a user's file, bytes or array into the
  model input (`model_input`, which is `unit_image` + `normalize`).

So a file prepared by a builder at the model's image size and the same file given to the API
give identical arrays: `read_gray` -> `to_square(S)` is what the builder stores, and `unit_image`
of that stored square is the stored pixels / 255.

The rules, each applied once here:

- formats: PNG (8- and 16-bit), JPEG and DICOM (recognised by the `DICM` marker at byte 128 or
  a `.dcm` suffix; modality and VOI LUTs applied, MONOCHROME1 inverted), and whatever else PIL
  reads;
- grayscale: colour images become their luminance (PIL's `L` conversion);
- intensities: uint8 is kept; any other range (16-bit PNG, DICOM pixel data, integer arrays,
  floats outside [0, 1]) is min-max scaled to uint8 (`rescale_to_uint8`; a constant image maps
  to 0); float arrays within [0, 1] are unit intensities (x 255, rounded);
- size: the longer side is resized to S (bicubic) and the image centred on a black S x S canvas,
  so the aspect ratio and the whole chest are kept (`to_square`).

Shapes: H, W a source image, S the model's (or stored) image size, B a batch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# A DICOM file (Part 10) starts with a 128-byte preamble and the marker b"DICM".
DICOM_MARKER = b"DICM"
DICOM_MARKER_OFFSET = 128
DICOM_SUFFIXES = (".dcm", ".dicom")

# PIL modes whose values are not 8-bit intensities: min-max scaled like DICOM pixel data.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

_DAMAGED_ADVICE = "it is damaged or not a PNG, JPEG or DICOM image; replace it or export it again"
_MISSING_ADVICE = "check the path"


class ImageReadError(ValueError):
  """An image cannot be read: missing, corrupt, truncated or not an image.

  The message names the file (or record) and says what to do. Builders record `reason` as the
  skip reason of the file.

  Attributes:
    reason: what is wrong, in words (e.g. "corrupt or truncated image (...)").
    name: the file's path, or a description such as "record 12" or "images[3]".
  """

  def __init__(self, reason: str, name: str, advice: str = _DAMAGED_ADVICE):
    super().__init__(f"{name}: {reason}; {advice}")
    self.reason = reason
    self.name = name


class ImageFileMissing(ImageReadError, FileNotFoundError):
  """The image file does not exist (also a FileNotFoundError)."""

  def __init__(self, reason: str, name: str):
    super().__init__(reason, name, _MISSING_ADVICE)


# ---------------------------------------------------------------------------------------------
# Reading files and bytes -> uint8 (H, W)


def _is_path(source: Any) -> bool:
  return isinstance(source, str | os.PathLike)


def _head(source: str | os.PathLike | bytes) -> bytes:
  """The first bytes of a file or buffer, enough to see the DICOM marker."""
  n = DICOM_MARKER_OFFSET + len(DICOM_MARKER)
  if _is_path(source):
    with open(source, "rb") as f:
      return f.read(n)
  return bytes(source[:n])


def is_dicom(source: str | os.PathLike | bytes) -> bool:
  """True for a DICOM file or buffer: the `DICM` marker at byte 128, or a `.dcm` suffix."""
  if _is_path(source) and Path(source).suffix.lower() in DICOM_SUFFIXES:
    return True
  head = _head(source)
  return head[DICOM_MARKER_OFFSET:] == DICOM_MARKER


def read_gray(
  source: str | os.PathLike | bytes | bytearray | memoryview,
  *,
  name: str | None = None,
  min_side: int | None = None,
) -> np.ndarray:
  """A radiograph file (path) or encoded image (bytes) as uint8 (H, W) grayscale.

  DICOM goes through `read_dicom`; anything else through PIL (PNG 8/16-bit, JPEG, ...): colour
  -> luminance, 16-bit / integer / float pixels -> min-max scaled to uint8.

  Args:
    source: a path, or the file's bytes.
    name: how errors name the image (default: the path, or "image bytes").
    min_side: JPEG only: decode at the smallest of 1, 1/2, 1/4, 1/8 scale that keeps both sides
      >= min_side (libjpeg's DCT scaling, in grayscale); about 2.5x faster on 2544x3056 files
      that are resized to a few hundred pixels anyway. The builders pass their stored size and
      the pipeline and API the model's, so that both decode the same way.

  Raises:
    ImageFileMissing: the path does not exist.
    ImageReadError: the content cannot be decoded (corrupt, truncated, not an image).
  """
  is_path = _is_path(source)
  if not is_path:
    source = bytes(source)
  if name is None:
    name = os.fspath(source) if is_path else "image bytes"
  if is_path and not os.path.isfile(source):
    dicom_name = Path(source).suffix.lower() in DICOM_SUFFIXES
    raise ImageFileMissing(f"{'DICOM' if dicom_name else 'image'} file missing", name)
  if is_dicom(source):
    return read_dicom(source, name=name)
  try:
    with Image.open(source if is_path else io.BytesIO(source)) as im:
      if min_side and im.format == "JPEG":
        im.draft("L", (min_side, min_side))
      im.load()  # decodes now, so a truncated file fails here, not later
      return pil_to_gray(im)
  except (OSError, SyntaxError, ValueError) as e:
    # PIL's own message for an unknown format names an anonymous buffer; say it plainly.
    detail = "unknown format" if isinstance(e, UnidentifiedImageError) else e
    what = "corrupt or truncated image" if is_path else "image bytes cannot be decoded"
    raise ImageReadError(f"{what} ({detail})", name) from None


def read_dicom(
  source: str | os.PathLike | bytes | bytearray | memoryview, *, name: str | None = None
) -> np.ndarray:
  """A DICOM radiograph (path or bytes) as uint8 (H, W).

  The modality LUT (rescale slope/intercept) and the VOI LUT (window) are applied and the
  result min-max scaled to uint8; MONOCHROME1 (white = low values) is inverted. Plain 8-bit
  pixel data without a window or rescale is kept as stored.

  Raises:
    ImageFileMissing: the path does not exist.
    ImageReadError: not a readable DICOM, no pixel data, undecodable pixel data, or more than
      one grayscale frame.
  """
  import pydicom
  from pydicom.pixels import apply_modality_lut, apply_voi_lut

  is_path = _is_path(source)
  if name is None:
    name = os.fspath(source) if is_path else "DICOM bytes"
  if is_path and not os.path.isfile(source):
    raise ImageFileMissing("DICOM file missing", name)
  try:
    ds = pydicom.dcmread(source if is_path else io.BytesIO(bytes(source)))
  except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as e:
    raise ImageReadError(f"not a readable DICOM file ({e})", name) from None
  if "PixelData" not in ds:
    raise ImageReadError("DICOM has no pixel data", name)
  try:
    pixels = ds.pixel_array
  except Exception as e:  # pydicom raises many types for broken pixel data
    raise ImageReadError(f"DICOM pixel data cannot be decoded ({e})", name) from None
  if pixels.ndim != 2:
    raise ImageReadError(
      f"expected one grayscale frame, got pixels of shape {pixels.shape}",
      name,
      "export a single grayscale frame",
    )
  if pixels.dtype == np.uint8 and "WindowCenter" not in ds and "RescaleSlope" not in ds:
    image = pixels
  else:
    image = rescale_to_uint8(apply_voi_lut(apply_modality_lut(pixels, ds), ds))
  if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
    image = 255 - image
  return np.asarray(image, np.uint8)


def pil_to_gray(im: Image.Image) -> np.ndarray:
  """A decoded PIL image as uint8 (H, W): 16-bit/int/float min-max scaled, colour -> luminance."""
  if im.mode in _WIDE_MODES:
    return rescale_to_uint8(np.asarray(im, np.float32))
  return np.asarray(im.convert("L"), np.uint8)


def rescale_to_uint8(x: np.ndarray) -> np.ndarray:
  """Min-max scales any-range pixel values (H, W) to uint8 (a constant image maps to 0)."""
  x = np.asarray(x, np.float32)
  lo, hi = float(x.min()), float(x.max())
  if hi <= lo:
    return np.zeros(x.shape, np.uint8)
  return np.round((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Arrays -> uint8 (H, W)


def array_to_gray(array: Any, name: str = "image") -> np.ndarray:
  """An image array as uint8 (H, W).

  Accepts (H, W), (H, W, 1), RGB (H, W, 3) or RGBA (H, W, 4) of uint8 (kept), bool (0/255),
  floats within [0, 1] (unit intensities: x 255, rounded), or other integers / floats (min-max
  scaled, as the builders scale 16-bit images); colour becomes its luminance.

  Raises:
    ValueError: another shape or dtype, or non-finite values; the message starts with `name`.
  """
  image = np.asarray(array)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if (
    image.ndim not in (2, 3)
    or (image.ndim == 3 and image.shape[-1] not in (3, 4))
    or (min(image.shape[:2], default=0) == 0)
  ):
    raise ValueError(
      f"{name}: expected a grayscale image (H, W) or (H, W, 1), or RGB (H, W, 3), got shape "
      f"{image.shape} dtype {image.dtype}"
    )
  if image.dtype == np.bool_:
    image = image.astype(np.uint8) * np.uint8(255)
  elif image.dtype != np.uint8:
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
      raise ValueError(f"{name}: image dtype {image.dtype} is not supported; pass uint8")
    values = image.astype(np.float32)
    if not np.isfinite(values).all():
      raise ValueError(f"{name}: the image holds NaN or infinite values")
    if np.issubdtype(image.dtype, np.floating) and values.min() >= 0.0 and values.max() <= 1.0:
      image = np.round(values * np.float32(255.0)).astype(np.uint8)
    else:
      image = rescale_to_uint8(values)
  if image.ndim == 3:
    image = np.asarray(Image.fromarray(image).convert("L"), np.uint8)
  return image


def load_gray(image: Any, *, name: str | None = None, min_side: int | None = None) -> np.ndarray:
  """Any accepted image as uint8 (H, W): a path or bytes (`read_gray`), a PIL image
  (`pil_to_gray`) or an array (`array_to_gray`)."""
  if _is_path(image) or isinstance(image, bytes | bytearray | memoryview):
    return read_gray(image, name=name, min_side=min_side)
  if isinstance(image, Image.Image):
    return pil_to_gray(image)
  return array_to_gray(image, name or "image")


# ---------------------------------------------------------------------------------------------
# Size and storage


def to_square(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W) -> uint8 (size, size): the longer side resized to `size` (bicubic), the
  image centred on a black canvas.

  Keeping the aspect ratio keeps the whole chest in view; stretching would distort anatomy.
  An image already (size, size) comes back unchanged.
  """
  image = np.asarray(image)
  if image.ndim != 2 or image.dtype != np.uint8:
    raise ValueError(f"to_square takes uint8 (H, W), got {image.dtype} {image.shape}")
  h, w = image.shape
  scale = size / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  resized = Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
  canvas = np.zeros((size, size), np.uint8)
  top, left = (size - nh) // 2, (size - nw) // 2
  canvas[top : top + nh, left : left + nw] = np.asarray(resized)
  return canvas


def encode_png(image: np.ndarray) -> bytes:
  """uint8 (H, W) -> PNG bytes (what the builders store; lossless, so decoding gives it back)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Model input


def unit_image(image: Any, size: int, *, name: str | None = None) -> np.ndarray:
  """A stored or given image as float32 (size, size) in [0, 1]: `load_gray`, then `to_square`
  when it is not already (size, size), then / 255.

  `image` is a path, encoded bytes (PNG, JPEG, DICOM), a PIL image or an array (see
  `array_to_gray`). JPEGs are decoded with `min_side=size`, as a builder of this size does.
  """
  gray = load_gray(image, name=name, min_side=size)
  if gray.shape != (size, size):
    gray = to_square(gray, size)
  return gray.astype(np.float32) * np.float32(1.0 / 255.0)


def gray_to_rgb(unit: np.ndarray) -> np.ndarray:
  """float32 (..., S, S) -> (..., S, S, 3): the gray value in every channel."""
  return np.repeat(unit[..., None], 3, axis=-1)


def normalize(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """float32 (..., 3) in [0, 1] -> (rgb - mean) / std per channel (config.data.image_mean/std),
  float32."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (rgb - mean) / std


def model_input(
  images: Sequence[Any], size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
  """Images -> float32 (B, size, size, 3), normalised: the ViT input.

  Each image is what `unit_image` takes (a path, bytes, a PIL image or an array); errors name
  paths by themselves and other images as `images[i]`.
  """
  out = []
  for i, image in enumerate(images):
    name = os.fspath(image) if _is_path(image) else f"images[{i}]"
    out.append(normalize(gray_to_rgb(unit_image(image, size, name=name)), mean, std))
  if not out:
    raise ValueError("no images given")
  return np.stack(out).astype(np.float32)
