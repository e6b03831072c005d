"""Procedural chest-radiograph phantoms, deterministic from (seed, index).

A phantom is a frontal (PA) chest radiograph drawn from simple shapes: body outline, shoulders,
lung fields, mediastinum, trachea, heart with a chosen cardiothoracic ratio (CTR), hemidiaphragms
with a gastric bubble, ribs, clavicles and spine; then pose, exposure, blur and noise. Findings
are drawn with a side, a zone and a severity (`Finding`), and every phantom carries its
CheXpert-style 1/0 labels (`findings.FINDINGS` order).

Geometry lives in normalised coordinates: x, y in [-1, 1], y pointing down, image left = the
patient's right (radiological convention). `side="right"` always means the patient's right.
Everything is vectorised numpy on coordinate grids cached per size; one 224 x 224 phantom takes
a few milliseconds on one core (docs/DATA.md has the measured figure).

Findings are deliberately conspicuous (the demo trains at 48 x 48 px): even "mild" changes
the image by several grey levels over tens of pixels at that size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medunifier_jax.data import findings as fnd

SIDES = ("right", "left", "bilateral")
ZONES = ("upper", "middle", "lower")
SEVERITIES = ("mild", "moderate", "severe")
DEVICES = ("endotracheal tube", "central venous catheter", "pacemaker", "ecg leads")

# Findings the sampler draws for non-normal studies, with relative frequency.
_SAMPLE_WEIGHTS = {
  "Atelectasis": 1.0,
  "Cardiomegaly": 1.0,
  "Consolidation": 0.8,
  "Edema": 0.8,
  "Pleural Effusion": 1.0,
  "Pneumonia": 0.7,
  "Pneumothorax": 0.6,
  "Nodule": 0.6,
  "Calcified Granuloma": 0.6,
  "Support Devices": 0.8,
  "COVID-19": 0.5,
}
# Findings that are always bilateral / never lateralised in these phantoms.
_BILATERAL = ("Edema", "COVID-19")
_UNLATERALISED = ("Cardiomegaly", "Support Devices")
_ZONED = ("Atelectasis", "Consolidation", "Pneumonia", "Nodule", "Calcified Granuloma")


@dataclasses.dataclass(frozen=True)
class Finding:
  """One finding to draw: a `findings.FINDINGS` name (not "No Finding") and where/how much.

  side: "right" | "left" | "bilateral" (patient sides) or None where it does not apply
  (cardiomegaly, devices). zone: "upper" | "middle" | "lower" or None (whole side / not zonal).
  severity: "mild" | "moderate" | "severe". count: number of lesions (nodules, granulomas).
  device: for "Support Devices", one of `DEVICES`.
  """

  name: str
  side: str | None = None
  zone: str | None = None
  severity: str = "moderate"
  count: int = 1
  device: str | None = None

  def __post_init__(self):
    fnd.finding_index(self.name)  # raises for unknown names
    if self.name == "No Finding":
      raise ValueError("'No Finding' is the absence of findings; pass an empty finding list")
    if self.side not in (None, *SIDES):
      raise ValueError(f"side must be one of {SIDES} or None, got {self.side!r}")
    if self.zone not in (None, *ZONES):
      raise ValueError(f"zone must be one of {ZONES} or None, got {self.zone!r}")
    if self.severity not in SEVERITIES:
      raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
    if self.device not in (None, *DEVICES):
      raise ValueError(f"device must be one of {DEVICES} or None, got {self.device!r}")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """Per-phantom anatomy and acquisition parameters (normalised units; see module docstring)."""

  thorax: float  # half-width of the lung fields at their widest
  body: float  # half-width of the body outline
  apex: float  # y of the lung apices
  dome_right: float  # y of the right hemidiaphragm dome (the left one is lower)
  dome_left: float
  angle_depth: float  # how far below its dome each costophrenic angle lies
  mediastinum: float  # half-width of the upper mediastinum
  ctr: float  # cardiothoracic ratio (cardiomegaly overrides it)
  heart_shift: float
  rib_spacing: float
  rib_phase: float
  gastric_bubble: bool
  breasts: float  # breast-shadow density (0 for none)
  rotation: float  # radians
  shift_x: float
  shift_y: float
  scale: float
  gain: float
  offset: float
  gamma: float
  noise: float
  blur: float  # Gaussian blur sigma as a fraction of the image size
  texture_offset: tuple[float, float]  # crop offset into the cached noise textures, in [0, 1)


@dataclasses.dataclass(frozen=True)
class Phantom:
  """A rendered phantom: image uint8 (S, S), labels float32 (F,), its findings and anatomy."""

  image: np.ndarray
  labels: np.ndarray
  findings: tuple[Finding, ...]
  anatomy: Anatomy

  @property
  def details(self) -> tuple[dict, ...]:
    return tuple(f.as_dict() for f in self.findings)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
  """Draws normal anatomy with realistic variation, small pose changes and exposure."""

  def u(lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))

  thorax = u(0.70, 0.80)
  dome_right = u(0.36, 0.46)
  return Anatomy(
    thorax=thorax,
    body=thorax + u(0.09, 0.15),
    apex=u(-0.78, -0.68),
    dome_right=dome_right,
    dome_left=dome_right + u(0.03, 0.08),
    angle_depth=u(0.12, 0.18),
    mediastinum=u(0.08, 0.11),
    ctr=u(0.38, 0.46),
    heart_shift=u(-0.03, 0.03),
    rib_spacing=u(0.15, 0.18),
    rib_phase=u(0.0, 1.0),
    gastric_bubble=bool(rng.random() < 0.7),
    breasts=u(0.03, 0.07) if rng.random() < 0.5 else 0.0,
    rotation=float(np.deg2rad(u(-4.0, 4.0))),
    shift_x=u(-0.04, 0.04),
    shift_y=u(-0.04, 0.04),
    scale=u(0.95, 1.05),
    gain=u(0.9, 1.05),
    offset=u(-0.04, 0.04),
    gamma=u(0.85, 1.15),
    noise=u(0.008, 0.025),
    blur=u(0.003, 0.006),
    texture_offset=(float(rng.random()), float(rng.random())),
  )


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def sample_finding(name: str, rng: np.random.Generator) -> Finding:
  """A random side / zone / severity for finding `name`."""
  severity = _pick(rng, SEVERITIES)
  if name in _UNLATERALISED:
    device = _pick(rng, DEVICES) if name == "Support Devices" else None
    return Finding(name, severity=severity, device=device)
  if name in _BILATERAL:
    return Finding(name, side="bilateral", severity=severity)
  side = _pick(rng, ("right", "left", "right", "left", "bilateral"))
  if name in _ZONED:
    zone = "lower" if name == "Atelectasis" and rng.random() < 0.6 else _pick(rng, ZONES)
    count = (
      int(rng.integers(2, 4))
      if name in ("Nodule", "Calcified Granuloma") and (rng.random() < 0.25)
      else 1
    )
    if name in ("Nodule", "Calcified Granuloma") and count == 1 and side == "bilateral":
      side = _pick(rng, ("right", "left"))
    return Finding(name, side=side, zone=zone, severity=severity, count=count)
  return Finding(name, side=side, severity=severity)  # effusion, pneumothorax


def sample_findings(
  rng: np.random.Generator, normal_fraction: float = 0.3, max_findings: int = 3
) -> tuple[Finding, ...]:
  """Random findings for a study: none with probability `normal_fraction`, else 1..max."""
  if rng.random() < normal_fraction:
    return ()
  names = list(_SAMPLE_WEIGHTS)
  p = np.array([_SAMPLE_WEIGHTS[n] for n in names])
  k = int(rng.integers(1, max_findings + 1))
  chosen = list(rng.choice(len(names), size=k, replace=False, p=p / p.sum()))
  picked = [names[i] for i in sorted(chosen)]
  if "COVID-19" in picked and "Pneumonia" in picked:  # one infectious pattern per study
    picked.remove("Pneumonia")
  return tuple(sample_finding(n, rng) for n in picked)


def labels_for(findings_: Sequence[Finding]) -> np.ndarray:
  """CheXpert-style 1/0 labels float32 (F,) for a finding list."""
  return fnd.labels_from_names(f.name for f in findings_)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates X, Y float32 (S, S) in [-1, 1]."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
  return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


@functools.lru_cache(maxsize=8)
def _textures(size: int) -> np.ndarray:
  """Noise fields float32 (3, 2S, 2S), zero mean, unit std, from a fixed seed.

  [0] fine (vessel-scale), [1] coarse (patchy airspace disease), [2] white (quantum noise).
  Phantoms crop them at a random offset, far cheaper than drawing fresh noise per image.
  """
  rng = np.random.default_rng(20250601)
  out = rng.standard_normal((3, 2 * size, 2 * size), dtype=np.float32)
  for k, sigma in enumerate((size / 70.0, size / 18.0)):
    f = ndimage.gaussian_filter(out[k], max(sigma, 0.6), mode="wrap")
    out[k] = (f - f.mean()) / f.std()
  return out


Window = tuple[slice, slice]


class _Canvas:
  """Pose-transformed coordinates (S, S) and anatomy masks of one phantom.

  Most structures are small, so they are computed only inside a window: `window(...)` turns a
  rectangle in (posed) normalised coordinates into row / column slices of the image.
  """

  def __init__(self, a: Anatomy, size: int):
    x0, y0 = _grid(size)
    self.cos, self.sin = float(np.cos(a.rotation)), float(np.sin(a.rotation))
    c, s = self.cos / a.scale, self.sin / a.scale
    self.x = c * x0 + s * y0 - a.shift_x
    self.y = c * y0 - s * x0 - a.shift_y
    self.a = a
    self.size = size
    tex = _textures(size)
    oy, ox = (int(a.texture_offset[0] * size), int(a.texture_offset[1] * size))
    self.fine = tex[0, oy : oy + size, ox : ox + size]
    self.coarse = tex[1, oy : oy + size, ox : ox + size]
    self.noise = tex[2, oy : oy + size, ox : ox + size]
    self.heart = self._heart(a.ctr)
    self.lung = {side: self._lung(side) for side in ("right", "left")}

  def window(self, x0: float, x1: float, y0: float, y1: float) -> Window:
    """Image slices that cover the posed rectangle [x0, x1] x [y0, y1] (plus a margin)."""
    a, n = self.a, self.size
    px, py = [], []
    for xp in (x0, x1):
      for yp in (y0, y1):
        u, v = (xp + a.shift_x) * a.scale, (yp + a.shift_y) * a.scale
        px.append(self.cos * u - self.sin * v)
        py.append(self.sin * u + self.cos * v)

    def span(lo, hi):
      return slice(max(0, int((lo + 1) / 2 * n) - 1), max(0, min(n, int((hi + 1) / 2 * n) + 2)))

    return span(min(py), max(py)), span(min(px), max(px))

  def side_window(self, side: str, x0: float, x1: float, y0: float, y1: float) -> Window:
    """`window` for a rectangle given in lateral coordinates of `side` (x0 < x1 >= 0)."""
    return self.window(-x1, -x0, y0, y1) if side == "right" else self.window(x0, x1, y0, y1)

  def lateral(self, side: str, w: Window) -> np.ndarray:
    """x towards `side`'s lateral chest wall in window `w` (the patient's right is image left)."""
    return -self.x[w] if side == "right" else self.x[w]

  def dome(self, side: str) -> float:
    return self.a.dome_right if side == "right" else self.a.dome_left

  def lung_window(self, side: str) -> Window:
    a = self.a
    return self.side_window(
      side,
      a.mediastinum - 0.02,
      a.thorax * 1.08 + 0.02,
      a.apex - 0.02,
      self.dome(side) + a.angle_depth + 0.02,
    )

  def _lung(self, side: str) -> np.ndarray:
    a = self.a
    w = self.lung_window(side)
    xs, y = self.lateral(side, w), self.y[w]
    cx, ax = (a.mediastinum + a.thorax) / 2, (a.thorax - a.mediastinum) / 2
    dome = self.dome(side)
    cy = a.apex + 0.45 * (dome - a.apex)
    upper = ((xs - cx) / ax) ** 2 + ((y - cy) / (cy - a.apex)) ** 2 < 1.0
    # Below the widest point the lateral wall flares a little; the diaphragm curves down to the
    # costophrenic angle laterally.
    flare = ax * (1.0 + 0.06 * (y - cy) / (dome - cy))
    # Dome: highest a third of the way out, falling steeply to the costophrenic angle and
    # gently to the cardiophrenic angle.
    u = (xs - a.mediastinum - 0.7 * ax) / (1.3 * ax)
    diaphragm = dome + a.angle_depth * u * u * np.where(u > 0, np.float32(1.0), np.float32(0.3))
    lower = (y >= cy) & (np.abs(xs - cx) < flare) & (y < diaphragm)
    out = np.zeros((self.size, self.size), bool)
    out[w] = ((upper & (y < cy)) | lower) & ~self.heart[w]
    return out

  def _heart(self, ctr: float) -> np.ndarray:
    a = self.a
    width = ctr * 2.0 * a.thorax
    hy, hv = a.dome_right - 0.1, 0.36
    w = self.window(
      a.heart_shift - 0.4 * width, a.heart_shift + 0.64 * width, hy - hv - 0.2, hy + hv + 0.2
    )
    xr = self.x[w] - a.heart_shift
    yr = self.y[w] - hy - 0.25 * xr  # the long axis points down to the left (the apex)
    half = np.where(xr > 0, np.float32(0.62 * width), np.float32(0.38 * width))
    out = np.zeros((self.size, self.size), bool)
    out[w] = (xr / half) ** 2 + (yr / hv) ** 2 < 1.0  # the heart lies mostly to the left
    return out

  def zone_centre(self, side: str, zone: str, rng: np.random.Generator) -> tuple[float, float]:
    """A point (x, y) inside `side`'s lung in `zone`, away from the heart."""
    a = self.a
    dome = self.dome(side)
    t = {"upper": (0.12, 0.3), "middle": (0.4, 0.58), "lower": (0.68, 0.85)}[zone]
    y = a.apex + rng.uniform(*t) * (dome - a.apex)
    frac = rng.uniform(0.5, 0.78) if zone != "upper" else rng.uniform(0.35, 0.65)
    xs = a.mediastinum + frac * (a.thorax - a.mediastinum)
    if zone != "upper":  # clear the heart border
      xs = max(xs, a.ctr * a.thorax * (1.2 if side == "left" else 0.8) + 0.1)
    return float(-xs if side == "right" else xs), float(y)

  def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> tuple[Window, np.ndarray]:
    """Window and 1 - r^2 of an axis-aligned ellipse (positive inside)."""
    w = self.window(cx - rx, cx + rx, cy - ry, cy + ry)
    return w, 1.0 - ((self.x[w] - cx) / rx) ** 2 - ((self.y[w] - cy) / ry) ** 2


def _sides(f: Finding) -> tuple[str, ...]:
  return ("right", "left") if f.side in (None, "bilateral") else (f.side,)


_SEV = {"mild": 0, "moderate": 1, "severe": 2}
_CTR = ((0.54, 0.58), (0.60, 0.65), (0.67, 0.73))


def render(
  findings_: Sequence[Finding], anatomy: Anatomy, size: int, rng: np.random.Generator
) -> np.ndarray:
  """Renders a phantom image uint8 (size, size). `rng` places lesions; noise is cached."""
  if size < 16:
    raise ValueError(f"phantom size must be at least 16 px, got {size}")
  a = anatomy
  for f in findings_:
    if f.name == "Cardiomegaly":
      a = dataclasses.replace(a, ctr=float(rng.uniform(*_CTR[_SEV[f.severity]])))
  cv = _Canvas(a, size)
  x, y = cv.x, cv.y
  ax = np.abs(x)

  # Soft tissue: neck, shoulders and arms above the axillae, chest wall below, abdomen.
  shoulder = 0.2 + np.sqrt(np.clip((y + 0.98) * 3.2, 0.0, 1.0))
  chest = a.body + (1.2 - a.body) * np.clip((-0.45 - y) / 0.15, 0.0, 1.0)
  body = ax < np.minimum(shoulder, chest)
  att = body * (0.6 - (0.1 / a.body) * np.minimum(ax, a.body)) + 0.03  # thicker in the middle
  for sx in (-0.9, 0.9):
    w, e = cv.ellipse(sx, -0.74, 0.13, 0.16)  # humeral heads
    att[w] += 0.14 * (e > 0)

  # Lungs are air: much darker, darker still at the apices, with vascular markings fanning
  # out from the hila.
  for side in ("right", "left"):
    w = cv.lung_window(side)
    lung, yw = cv.lung[side][w], y[w]
    hx = (a.mediastinum + 0.1) * (-1.0 if side == "right" else 1.0)
    near_hilum = 1.0 / (1.0 + ((x[w] - hx) ** 2 + yw * yw) * 8.0)
    vessels = np.clip(1.0 - np.abs(cv.fine[w]) * 2.2, 0.0, 1.0)
    rim = (cv.lateral(side, w) * (1.0 / a.thorax)) ** 4  # chest-wall soft tissue overlaps
    att[w] -= lung * (0.34 - 0.06 * yw - 0.06 * rim - near_hilum * (0.05 + 0.12 * vessels))
  if a.breasts:
    for sx in (-0.45, 0.45):
      w, e = cv.ellipse(sx, a.dome_right + 0.05, 0.35, 0.25)
      att[w] += a.breasts * (e > 0)

  # Heart and mediastinum stay soft-tissue dense; the trachea is an air column.
  att += 0.05 * (cv.heart & (y < a.dome_left))
  w, e = cv.ellipse(a.mediastinum + 0.02, -0.3, 0.07, 0.07)  # aortic knob
  att[w] = np.where((e > 0) & cv.lung["left"][w], np.float32(0.55), att[w])
  w = cv.window(-0.03, 0.03, -1.0, -0.15)
  att[w] -= 0.1 * ((np.abs(x[w]) < 0.03) & (y[w] < -0.15) & body[w])
  if a.gastric_bubble:
    w, e = cv.ellipse(0.32, a.dome_left + 0.1, 0.1, 0.05)
    att[w] -= 0.2 * (e > 0)

  # Bones: spine, ribs (posterior arcs, fainter anterior ones), clavicles.
  w = cv.window(-0.06, 0.06, -1.0, 1.0)
  att[w] += 0.1 * ((np.abs(x[w]) < 0.055) & body[w])
  w = cv.window(-a.thorax - 0.06, a.thorax + 0.06, a.apex - 0.2, a.dome_left + 0.3)
  axw = ax[w]
  v_post = (y[w] + 0.3 * axw - 0.75 * axw * axw) / a.rib_spacing + a.rib_phase
  v_ant = (y[w] - 0.5 * axw) / (1.25 * a.rib_spacing)
  ribs = 0.07 * np.clip(np.abs(2.0 * (v_post % 1.0) - 1.0) * 3.0 - 1.6, 0.0, 1.0)
  ribs += 0.03 * np.clip(np.abs(2.0 * (v_ant % 1.0) - 1.0) * 4.0 - 3.0, 0.0, 1.0)
  att[w] += ribs * ((axw > 0.06) & (axw < a.thorax + 0.06))
  w = cv.window(-0.75, 0.75, -0.95, -0.6)
  axw = ax[w]
  clav_y = -0.66 - 0.3 * (axw - 0.08) + 0.25 * (axw - 0.35) ** 2
  att[w] += 0.14 * ((np.abs(y[w] - clav_y) < 0.032) & (axw > 0.07) & (axw < 0.72))

  for f in findings_:
    _draw(f, att, cv, rng)

  # Acquisition: exposure, blur, noise; the gamma curve goes through a lookup table.
  # Anatomy stays below saturation; metal (devices) and calcium (granulomas) reach it.
  img = att * (a.gain / 0.9) + (a.offset - 0.03 * a.gain / 0.9)
  sigma = a.blur * size
  if sigma >= 0.35:
    img = ndimage.gaussian_filter(img, sigma, truncate=2.5)
  img += a.noise * cv.noise
  levels = np.clip(img * 1023.0, 0.0, 1023.0).astype(np.int16)
  return _gamma_lut(round(a.gamma, 2))[levels]


@functools.lru_cache(maxsize=64)
def _gamma_lut(gamma: float) -> np.ndarray:
  return (255.0 * (np.arange(1024) / 1023.0) ** gamma + 0.5).astype(np.uint8)


def _draw(f: Finding, att: np.ndarray, cv: _Canvas, rng: np.random.Generator) -> None:
  """Adds finding `f` to the attenuation map `att` (S, S) in place."""
  a, sev = cv.a, _SEV[f.severity]
  x, y = cv.x, cv.y
  if f.name == "Cardiomegaly":
    return  # drawn through the enlarged heart outline
  if f.name == "Pleural Effusion":
    for side in _sides(f):
      angle = cv.dome(side) + a.angle_depth
      height = (0.2, 0.32, 0.48)[sev] * (angle - a.apex) * 0.75
      w = cv.side_window(side, a.mediastinum, a.thorax * 1.1, angle - height - 0.15, angle + 0.05)
      u = np.clip((cv.lateral(side, w) - a.mediastinum) / (a.thorax - a.mediastinum), 0.0, 1.0)
      level = angle - height - 0.14 * u * u  # meniscus: higher along the lateral wall
      fluid = np.clip((y[w] - level) * 20.0, 0.0, 1.0) * cv.lung[side][w]
      att[w] += fluid * (0.58 - att[w])
    return
  if f.name in ("Consolidation", "Pneumonia"):
    for side in _sides(f):
      cx, cy = cv.zone_centre(side, f.zone or "lower", rng)
      r = (0.16, 0.2, 0.26)[sev]
      w, e = cv.ellipse(cx, cy, r * rng.uniform(1.0, 1.3), r)
      bump = np.sqrt(np.clip(e, 0.0, 1.0))
      if f.name == "Pneumonia":  # patchy, ill-defined airspace disease
        bump *= np.clip(0.7 + 0.45 * cv.coarse[w], 0.3, 1.0)
        dens = (0.34, 0.38, 0.42)[sev]
      else:  # dense, homogeneous lobar opacity
        bump = np.clip(bump * 1.6, 0.0, 1.0)
        dens = (0.25, 0.3, 0.34)[sev]
      att[w] += dens * bump * cv.lung[side][w]
    return
  if f.name == "Atelectasis":
    for side in _sides(f):
      cx, cy = cv.zone_centre(side, f.zone or "lower", rng)
      tilt = rng.uniform(-0.25, 0.1) * (-1 if side == "right" else 1)
      half = 0.2 + 0.05 * sev
      w = cv.window(cx - half, cx + half, cy - 0.2, cy + 0.2)
      xw, yw = x[w], y[w]
      for k in range(sev + 1):  # plate-like bands, more of them when worse
        yk = cy + (k - sev / 2) * 0.09
        band = (np.abs(yw - yk - tilt * (xw - cx)) < (0.028, 0.032, 0.036)[sev]) & (
          np.abs(xw - cx) < half
        )
        att[w] += 0.3 * (band & cv.lung[side][w])
    return
  if f.name == "Edema":
    dens = (0.2, 0.24, 0.28)[sev]
    for side in ("right", "left"):
      w = cv.lung_window(side)
      xs, yw = cv.lateral(side, w), y[w]
      r2 = ((xs - a.mediastinum - 0.1) / 0.38) ** 2 + ((yw - 0.05) / 0.45) ** 2
      haze = np.exp(-r2) * (0.85 + 0.15 * cv.coarse[w])  # perihilar "bat wing"
      kerley = (np.cos(yw * (2 * np.pi / 0.06)) > 0.6) & (xs > a.thorax - 0.14) & (yw > 0.05)
      att[w] += (dens * haze + (0.12 + 0.04 * sev) * kerley) * cv.lung[side][w]
    return
  if f.name == "COVID-19":
    dens = (0.22, 0.26, 0.3)[sev]
    for side in ("right", "left"):
      w = cv.lung_window(side)
      xs = cv.lateral(side, w)
      periph = np.exp(-(((xs - a.thorax + 0.06) / 0.24) ** 2)) * np.clip((y[w] + 0.3) * 2, 0, 1)
      patch = np.clip(0.6 + 0.6 * cv.coarse[w], 0.0, 1.0)  # multifocal ground glass
      att[w] += dens * periph * patch * cv.lung[side][w]
    return
  if f.name == "Pneumothorax":
    _pneumothorax(f, att, cv)
    return
  if f.name in ("Nodule", "Calcified Granuloma"):
    for side in _sides(f):
      for _ in range(f.count):
        cx, cy = cv.zone_centre(side, f.zone or _pick(rng, ZONES), rng)
        cx += rng.uniform(-0.08, 0.08)
        if f.name == "Nodule":
          r = (0.06, 0.075, 0.095)[sev]
          w, e = cv.ellipse(cx, cy, r, r)
          bump = 0.38 * np.sqrt(np.clip(e, 0.0, 1.0))
        else:  # calcified: small, as dense as metal
          r = (0.035, 0.042, 0.05)[sev]
          w, e = cv.ellipse(cx, cy, r, r)
          bump = 0.75 * np.clip(2.0 * e, 0.0, 1.0)
        att[w] += bump * cv.lung[side][w]
    return
  if f.name == "Support Devices":
    _device(f.device or "endotracheal tube", att, cv)
    return
  raise ValueError(f"no renderer for finding {f.name!r}")


def _pneumothorax(f: Finding, att: np.ndarray, cv: _Canvas) -> None:
  """Air between the lung edge and the chest wall: no markings there, a thin visceral line."""
  a = cv.a
  gap = (0.14, 0.21, 0.3)[_SEV[f.severity]]
  for side in _sides(f):
    w = cv.lung_window(side)
    xs, y = cv.lateral(side, w), cv.y[w]
    cx, ax = (a.mediastinum + a.thorax) / 2, (a.thorax - a.mediastinum) / 2
    dome = cv.dome(side)
    cy = a.apex + 0.45 * (dome - a.apex)
    taper = np.clip((dome - y) / (dome - cy), 0.0, 1.0)  # apical-lateral, thinning downwards
    collapsed, edge = (
      np.where(
        y < cy,
        ((xs - cx + g / 2) / (ax - g / 2)) ** 2 + ((y - cy) / (cy - a.apex - g)) ** 2 < 1,
        (y >= cy) & (xs < cx + ax - g * taper),
      )
      for g in (gap, gap - 0.025)  # the lung edge, and a thin shell outside it
    )
    lung = cv.lung[side][w]
    air = lung & ~collapsed
    line = lung & edge & ~collapsed
    # Remove everything the lung added, then make it darker than aerated lung.
    aw = np.where(air, np.minimum(att[w], np.float32(0.14)), att[w])
    att[w] = aw + 0.22 * line + 0.05 * (lung & collapsed)


def _device(device: str, att: np.ndarray, cv: _Canvas) -> None:
  x, y, a = cv.x, cv.y, cv.a
  metal = 0.9
  if device == "endotracheal tube":
    w = cv.window(-0.03, 0.03, -1.0, -0.32)
    att[w] += metal * ((np.abs(x[w]) < 0.022) & (y[w] < -0.32))
  elif device == "central venous catheter":
    # Right subclavian approach: down the brachiocephalic vein into the SVC.
    w = cv.window(-0.6, 0.0, -0.75, -0.1)
    yw = y[w]
    path_x = -0.55 + 0.5 * np.sqrt(np.clip((yw + 0.72) * 2.0, 0, 1))
    att[w] += metal * ((np.abs(x[w] - path_x) < 0.018) & (yw > -0.74) & (yw < -0.1))
  elif device == "pacemaker":
    w = cv.window(0.4, 0.6, -0.665, -0.535)
    att[w] += 1.0 * ((np.abs(x[w] - 0.5) < 0.1) & (np.abs(y[w] + 0.6) < 0.065))
    w = cv.window(0.0, 0.55, -0.56, a.dome_right)
    yw = y[w]
    lead_x = 0.5 - 0.45 * np.clip((yw + 0.55) / 0.85, 0, 1)
    att[w] += metal * ((np.abs(x[w] - lead_x) < 0.015) & (yw > -0.55) & (yw < a.dome_right - 0.05))
  elif device == "ecg leads":
    for px, py in ((-0.45, -0.45), (0.45, -0.45), (0.5, 0.3), (-0.5, 0.3)):
      w, e = cv.ellipse(px, py, 0.055, 0.055)
      att[w] += metal * ((e > 0) & (e < 1.0 - (0.03 / 0.055) ** 2))
  else:
    raise ValueError(f"unknown device {device!r}; choose one of {DEVICES}")


def make_phantom(
  seed: int | Sequence[int],
  index: int,
  size: int = 224,
  findings_: Sequence[Finding] | None = None,
  normal_fraction: float = 0.3,
) -> Phantom:
  """The phantom for (seed, index): identical pixels for identical arguments, in any order.

  `seed` may be a tuple of ints (a stream, e.g. (seed, set, split)). With `findings_=None` the
  findings are drawn too (`sample_findings`); otherwise the given findings are drawn on a
  random anatomy.
  """
  stream = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
  rng = np.random.default_rng([*stream, int(index)])
  drawn = sample_findings(rng, normal_fraction) if findings_ is None else tuple(findings_)
  anatomy = sample_anatomy(rng)
  image = render(drawn, anatomy, size, rng)
  return Phantom(image=image, labels=labels_for(drawn), findings=drawn, anatomy=anatomy)
