"""One image preprocessing for the builders, the input pipeline and the inference API.

A file prepared by a builder at the model's size (load -> to_square -> PNG, then what the
pipeline makes of the stored record) and the same file given to the API must give identical
model inputs, for wide PNGs, 16-bit PNGs, DICOM and colour JPEGs alike.
"""

import io

import numpy as np
import pytest
from configs_util import load_config
from PIL import Image

from medunifier_jax import api, model_io
from medunifier_jax.data import images, pipeline
from medunifier_jax.data import tokenizer as tokenizer_lib
from medunifier_jax.data.builders import common

S = 48  # the tiny configuration's image size; the builder stores this size too


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> None:
  """An uncompressed 16-bit (12 bits stored) grayscale DICOM, without window or rescale."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "CR"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)


def chest(shape, seed=0) -> np.ndarray:
  """A smooth float image in [0, 1] with some texture: bright mediastinum, darker lungs."""
  h, w = shape
  y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
  body = 0.4 + 0.5 * np.exp(-(((x - 0.5) / 0.12) ** 2)) - 0.2 * np.exp(-(((y - 0.5) / 0.3) ** 2))
  noise = np.random.default_rng(seed).normal(0.0, 0.03, shape)
  return np.clip(body + noise, 0.0, 1.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """name -> path of the test files, plus the raw 16-bit and DICOM pixels."""
  root = tmp_path_factory.mktemp("images")
  out = {}
  out["white"] = root / "white.png"  # 300 wide, 200 high
  Image.fromarray(np.full((200, 300), 255, np.uint8)).save(out["white"])
  out["wide"] = root / "wide.png"
  Image.fromarray(np.round(chest((200, 300)) * 255).astype(np.uint8)).save(out["wide"])
  # 16-bit: values 2000..3000 and one bright pixel of 4000 (division by the maximum would put
  # the darkest pixel at 0.5).
  deep = np.round(2000 + 1000 * chest((90, 70), seed=1)).astype(np.uint16)
  deep[5, 7] = 4000
  out["deep"] = root / "deep.png"
  Image.fromarray(deep).save(out["deep"])
  out["deep_pixels"] = deep
  ct = np.round(100 + 3000 * chest((64, 80), seed=2)).astype(np.uint16)
  out["dicom"] = root / "chest.dcm"
  write_dicom(out["dicom"], ct)
  out["dicom1"] = root / "inverted.dcm"
  write_dicom(out["dicom1"], ct, "MONOCHROME1")
  out["dicom_pixels"] = ct
  rgb = np.stack([chest((400, 330), seed=3)] * 3, -1) * np.array([1.0, 0.9, 0.8])
  out["jpeg"] = root / "colour.jpg"
  Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(out["jpeg"], quality=90)
  return out


@pytest.fixture(scope="module")
def config():
  return load_config("tiny")


@pytest.fixture(scope="module")
def processor_for(config, tmp_path_factory):
  """stored uint8 (S, S) -> the pipeline's `ExampleProcessor` over one record holding it."""
  corpus = ["the heart size is normal", "small right pleural effusion"] * 4
  tokenizer = tokenizer_lib.get_tokenizer(config.data, corpus, str(tmp_path_factory.mktemp("t")))

  def make(stored):
    record = {"image": stored, "report": "heart normal", "id": "r0"}
    return pipeline.ExampleProcessor.from_config([record], tokenizer, config.data)

  return make


def builder_then_pipeline(path, processor_for) -> dict:
  """What a builder of size S stores for `path`, read back as the source reads it and made into
  an example by the pipeline."""
  if path.suffix == ".dcm":
    pixels = common.load_dicom(path)
  else:
    pixels = common.load_image(path, min_side=S)  # as RadiographBuilder._load_image
  png = common.encode_png(common.to_square(pixels, S))
  with Image.open(io.BytesIO(png)) as stored:  # as builders/source.py decodes a record
    record_image = np.asarray(stored, np.uint8)
  return processor_for(record_image)(0)


NAMES = ("white", "wide", "deep", "dicom", "dicom1", "jpeg")


def test_builder_pipeline_and_api_give_identical_inputs(files, config, processor_for):
  mean, std = config.data.image_mean, config.data.image_std
  paths = [files[n] for n in NAMES]
  api_batch = images.model_input([str(p) for p in paths], S, mean, std)
  assert api_batch.shape == (len(NAMES), S, S, 3) and api_batch.dtype == np.float32
  for i, (name, path) in enumerate(zip(NAMES, paths)):
    example = builder_then_pipeline(path, processor_for)
    np.testing.assert_array_equal(api_batch[i], example["image"], err_msg=name)
    np.testing.assert_array_equal(
      images.gray_to_rgb(images.unit_image(path, S)), example["target_image"], err_msg=name
    )
  # The file's bytes and a Path give the same input as the path string.
  same = images.model_input([files["jpeg"].read_bytes(), files["dicom"]], S, mean, std)
  np.testing.assert_array_equal(same, api_batch[[5, 3]])
  # The API method is this function (a model built abstractly: no weights, no compilation).
  model = api.Model(model_io.build_abstract(config), config)
  np.testing.assert_array_equal(model.preprocess_images([str(p) for p in paths]), api_batch)
  np.testing.assert_array_equal(model.preprocess_images(str(paths[0])), api_batch[:1])


def test_wide_image_is_padded_not_stretched(files):
  unit = images.unit_image(files["white"], S)
  assert unit.shape == (S, S) and unit.dtype == np.float32
  assert unit.mean() == pytest.approx(2 / 3, abs=1e-6)  # 300 x 200 -> 48 x 32 of white
  assert (unit[:8] == 0).all() and (unit[-8:] == 0).all() and (unit[8:-8] == 1).all()
  # An array of the same picture goes the same way.
  np.testing.assert_array_equal(
    images.unit_image(np.full((200, 300), 255, np.uint8), S, name="a"), unit
  )


def test_sixteen_bit_png_is_min_max_scaled(files):
  with Image.open(files["deep"]) as im:
    assert im.mode.startswith("I")  # really a 16-bit file
  deep = files["deep_pixels"].astype(np.float64)
  gray = images.read_gray(files["deep"])
  expected = np.round((deep - deep.min()) * 255 / (deep.max() - deep.min())).astype(np.uint8)
  np.testing.assert_array_equal(gray, expected)
  assert gray.min() == 0 and gray.max() == 255  # full range; not 2000/4000 at the dark end
  unit = images.unit_image(files["deep"], S)
  np.testing.assert_array_equal(unit, images.to_square(expected, S) * np.float32(1 / 255))
  # The same pixels as an array follow the same rule.
  np.testing.assert_array_equal(images.unit_image(files["deep_pixels"], S), unit)


def test_dicom_is_read_from_paths_and_bytes_and_monochrome1_inverted(files):
  expected = images.rescale_to_uint8(files["dicom_pixels"])
  np.testing.assert_array_equal(images.read_gray(files["dicom"]), expected)
  np.testing.assert_array_equal(images.read_gray(files["dicom"].read_bytes()), expected)
  np.testing.assert_array_equal(images.read_gray(files["dicom1"]), 255 - expected)
  np.testing.assert_array_equal(common.load_dicom(files["dicom"]), expected)
  # Recognised by its marker without the suffix.
  assert images.is_dicom(files["dicom"].read_bytes()) and not images.is_dicom(b"\x89PNG")


def test_arrays_follow_the_file_rules(files):
  gray = images.read_gray(files["wide"])
  rgb = np.stack([gray] * 3, -1)
  for array in (gray[..., None], rgb, gray / np.float32(255)):
    np.testing.assert_array_equal(images.array_to_gray(array), gray)
  with pytest.raises(ValueError, match="images\\[1\\]: expected a grayscale"):
    images.model_input([gray, np.zeros((4, 4, 2))], S, (0, 0, 0), (1, 1, 1))
  with pytest.raises(ValueError, match="NaN"):
    images.array_to_gray(np.full((4, 4), np.nan))


def test_unreadable_files_name_the_file(files, tmp_path):
  data = files["jpeg"].read_bytes()
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(data[: len(data) // 2])
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"not an image at all")
  bad_dicom = tmp_path / "bad.dcm"
  bad_dicom.write_bytes(b"\x00" * 64 + b"not a dicom file")
  for path in (truncated, garbage, bad_dicom):
    with pytest.raises(images.ImageReadError, match=f"{path.name}: .*replace it") as error:
      images.read_gray(path)
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match=path.name):
      images.model_input([str(path)], S, (0, 0, 0), (1, 1, 1))
  with pytest.raises(FileNotFoundError, match="absent.png: image file missing; check the path"):
    images.model_input([str(tmp_path / "absent.png")], S, (0, 0, 0), (1, 1, 1))
  with pytest.raises(ValueError, match="record 7: image bytes cannot be decoded"):
    pipeline.gray_unit_image(b"not a png", S, "7")
  # The builders turn the same errors into skips with their reasons.
  with pytest.raises(common.SkipExample) as skip:
    common.load_image(truncated)
  assert skip.value.reason.startswith("corrupt or truncated image") and skip.value.path == truncated
  with pytest.raises(common.SkipExample, match="image file missing"):
    common.load_image(tmp_path / "absent.png")
  with pytest.raises(common.SkipExample, match="not a readable DICOM"):
    common.load_dicom(bad_dicom)


def test_stored_square_images_are_only_scaled():
  stored = np.random.default_rng(0).integers(0, 256, (S, S), dtype=np.uint8)
  unit = pipeline.gray_unit_image(stored, S, "r")
  np.testing.assert_array_equal(unit, stored.astype(np.float32) * np.float32(1 / 255))
  np.testing.assert_array_equal(images.to_square(stored, S), stored)
