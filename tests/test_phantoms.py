"""Phantoms: every finding is measurable in small images, rendering is deterministic, and
templated reports never state a finding the labels deny."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from medunifier_jax.data import findings as F
from medunifier_jax.data import phantoms as P
from medunifier_jax.data import reports as R

SIZE = 48  # the demo's image size: findings must be visible here
N_NORMAL, N_POSITIVE = 100, 40
MIN_AUC = 0.9

_c = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1
X, Y = np.meshgrid(_c, _c)


def _box(x0, x1, y0, y1):
  return (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)


def _sides(x0, x1, y0, y1):
  """The same box on the image's left (patient right) and right (patient left)."""
  return [_box(-x1, -x0, y0, y1), _box(x0, x1, y0, y1)]


LUNGS = _box(-0.72, 0.72, -0.65, 0.45) & (np.abs(X) > 0.25)
# Overlapping lung zones (5 heights x 2 widths x 2 sides) for the focal-opacity measurement.
ZONES = [
  b
  for y0, y1 in ((-0.65, -0.35), (-0.45, -0.15), (-0.25, 0.05), (-0.05, 0.25), (0.1, 0.4))
  for x0, x1 in ((0.25, 0.55), (0.45, 0.75))
  for b in _sides(x0, x1, y0, y1)
]


def heart_width(im):
  """Columns of the heart band brighter than halfway between dark lung and bright heart."""
  row = im[(_c > 0.05) & (_c < 0.35)].mean(0)
  lo, hi = np.percentile(row[np.abs(_c) < 0.75], [10, 90])
  return np.sum((row > (lo + hi) / 2) & (np.abs(_c) < 0.75))


def angle_intensity(im):
  """Brightest costophrenic-angle region (fluid there is as dense as soft tissue)."""
  return max(im[b].mean() for b in _sides(0.45, 0.75, 0.3, 0.6))


def darkest_lung(im):
  """How far the darkest lung pixels fall below the median (free air has no markings)."""
  lung = _box(-0.8, 0.8, -0.8, 0.2) & (np.abs(X) > 0.2)
  return np.median(im[lung]) - np.percentile(im[lung], 3)


def spot_contrast(im):
  """Brightest small spot in the lungs against its 5x5 neighbourhood median."""
  return (im - ndimage.median_filter(im, 5))[LUNGS].max()


def nodule_contrast(im):
  return np.percentile((im - ndimage.uniform_filter(im, 7))[LUNGS], 99.5)


def band_contrast(im):
  """Thin horizontal bright bands: white top-hat with a vertical 5-pixel element."""
  return np.percentile(ndimage.white_tophat(im, size=(5, 1))[LUNGS], 99)


def saturated(im):
  return np.sum(im > 0.985)


def perihilar(im):
  return np.mean([im[b].mean() for b in _sides(0.15, 0.5, -0.2, 0.3)])


def peripheral_lower(im):
  """Both lower lateral regions against the upper lungs: the least opaque side counts."""
  ref = np.mean([im[b].mean() for b in _sides(0.3, 0.6, -0.6, -0.3)])
  return min(im[b].mean() for b in _sides(0.5, 0.75, 0.0, 0.35)) - ref


def focal_opacity(im, mu, sd):
  """Largest lung-zone brightness, as a z-score against the normal phantoms' zones."""
  return np.max((np.array([im[b].mean() for b in ZONES]) - mu) / sd)


MEASURES = {
  "Cardiomegaly": heart_width,
  "Pleural Effusion": angle_intensity,
  "Consolidation": "focal",
  "Pneumonia": "focal",
  "Atelectasis": band_contrast,
  "Edema": perihilar,
  "Pneumothorax": darkest_lung,
  "Nodule": nodule_contrast,
  "Calcified Granuloma": spot_contrast,
  "Support Devices": saturated,
  "COVID-19": peripheral_lower,
}


def _image(seed, index, findings_):
  return P.make_phantom(seed, index, SIZE, findings_).image.astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def normals():
  return [_image(11, i, ()) for i in range(N_NORMAL)]


@pytest.fixture(scope="module")
def zone_stats(normals):
  z = np.array([[im[b].mean() for b in ZONES] for im in normals])
  return z.mean(0), z.std(0)


def test_measures_cover_every_finding():
  assert set(MEASURES) == set(F.FINDINGS) - {"No Finding"}


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_finding_separates_from_normal(name, normals, zone_stats):
  """A simple image measurement tells phantoms with the finding (any severity, side, zone)
  from normal ones at 48 x 48 px: ROC AUC >= 0.9."""
  measure = MEASURES[name]
  if measure == "focal":
    measure = lambda im: focal_opacity(im, *zone_stats)
  positives = []
  for i in range(N_POSITIVE):
    f = P.sample_finding(name, np.random.default_rng([12, i]))
    positives.append(_image(13, i, (f,)))
  scores = [measure(im) for im in positives + normals]
  y = [1] * len(positives) + [0] * len(normals)
  auc = roc_auc_score(y, scores)
  assert auc >= MIN_AUC, f"{name}: AUC {auc:.3f} < {MIN_AUC}"


@pytest.mark.parametrize(
  "name,measure", [("Cardiomegaly", heart_width), ("Pleural Effusion", angle_intensity)]
)
def test_severity_grades_the_measurement(name, measure):
  """Mean measurement rises with severity (same anatomies across the three grades)."""
  means = []
  for severity in P.SEVERITIES:
    f = P.Finding(name, side="bilateral" if name != "Cardiomegaly" else None, severity=severity)
    means.append(np.mean([measure(_image(14, i, (f,))) for i in range(24)]))
  assert means[0] < means[1] < means[2], means


def test_laterality_is_patient_side():
  """A right-sided effusion brightens the image's left costophrenic angle (radiological view)."""
  f = P.Finding("Pleural Effusion", side="right", severity="severe")
  diffs = []
  for i in range(10):
    im, ref = _image(15, i, (f,)), _image(15, i, ())
    left_box, right_box = _sides(0.45, 0.75, 0.3, 0.6)
    diffs.append((im - ref)[left_box].mean() - (im - ref)[right_box].mean())
  assert min(diffs) > 0.05


def test_same_seed_index_gives_identical_pixels_in_any_order():
  order = [5, 0, 17, 3]
  first = {i: P.make_phantom(7, i, 64) for i in order}
  again = {i: P.make_phantom(7, i, 64) for i in reversed(order)}
  for i in order:
    np.testing.assert_array_equal(first[i].image, again[i].image)
    np.testing.assert_array_equal(first[i].labels, again[i].labels)
    assert first[i].findings == again[i].findings
  assert not np.array_equal(first[5].image, first[0].image)
  assert not np.array_equal(P.make_phantom(8, 5, 64).image, first[5].image)


def test_image_contract_and_sizes():
  for size in (16, 48, 224):
    p = P.make_phantom(0, 1, size)
    assert p.image.shape == (size, size) and p.image.dtype == np.uint8
    assert p.labels.shape == (F.NUM_FINDINGS,) and p.labels.dtype == np.float32
    assert 20 < p.image.mean() < 235  # neither blank nor saturated
  with pytest.raises(ValueError, match="at least 16"):
    P.make_phantom(0, 1, 8)


def test_labels_follow_findings():
  assert F.names_from_labels(P.labels_for(())) == ("No Finding",)
  fs = (P.Finding("Nodule", side="left", zone="upper"), P.Finding("Cardiomegaly"))
  assert F.names_from_labels(P.labels_for(fs)) == ("Cardiomegaly", "Nodule")
  devices = (P.Finding("Support Devices", device="pacemaker"),)
  assert F.names_from_labels(P.labels_for(devices)) == ("No Finding", "Support Devices")
  for i in range(200):
    p = P.make_phantom(3, i, 16)
    names = {f.name for f in p.findings}
    normal = names <= {"Support Devices"}  # CheXpert: devices alone are "No Finding"
    assert set(F.names_from_labels(p.labels)) == names | ({"No Finding"} if normal else set())


def test_finding_validation_names_the_fix():
  with pytest.raises(ValueError, match="side must be one of"):
    P.Finding("Pleural Effusion", side="top")
  with pytest.raises(ValueError, match="absence of findings"):
    P.Finding("No Finding")
  with pytest.raises(KeyError, match="known findings"):
    P.Finding("Fracture")


def test_templated_reports_never_state_denied_findings():
  """Negation-aware matching: positives mentioned == findings drawn; no drawn one negated."""
  for i in range(600):
    rng = np.random.default_rng([16, i])
    fs = P.sample_findings(rng)
    text = R.templated_report(fs, rng)
    assert text.startswith("FINDINGS: ") and "\nIMPRESSION: " in text
    positive, negative = R.mentioned_findings(text)
    names = {f.name for f in fs}
    assert positive == names, text
    assert not negative & names, text


def test_templated_report_states_severity_and_side():
  rng = np.random.default_rng(0)
  f = P.Finding("Pleural Effusion", side="left", severity="severe")
  text = R.templated_report((f,), rng)
  assert "left" in text and "large" in text.lower()
  f = P.Finding("Cardiomegaly", severity="mild")
  texts = {R.templated_report((f,), np.random.default_rng(i)) for i in range(20)}
  assert all(any(w in t.lower() for w in ("mild", "minimal", "slight")) for t in texts)
  assert len(texts) > 3  # varied phrasing


def test_matcher_reads_negations():
  pos, neg = R.mentioned_findings("No pleural effusion or pneumothorax. Mild cardiomegaly.")
  assert pos == {"Cardiomegaly"} and neg == {"Pleural Effusion", "Pneumothorax"}


def test_templated_reports_are_deterministic():
  a = R.templated_report(P.sample_findings(np.random.default_rng(3)), np.random.default_rng(4))
  b = R.templated_report(P.sample_findings(np.random.default_rng(3)), np.random.default_rng(4))
  assert a == b
