"""Contact sheets of phantoms, as a library: what `python -m medunifier_jax.data.contact_sheet`
draws. `write_contact_sheet` renders examples of a registered phantom set into one PNG, each
cell with the image, its positive labels (with side / severity) and the start of its report.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402

from medunifier_jax.data import registry, sets  # noqa: E402


def _finding_line(example: sets.Example) -> str:
  """The example's findings with where and how severe, or "No Finding"."""
  if not example.phantom.findings:
    return "No Finding"
  parts = []
  for f in example.phantom.findings:
    where = " ".join(x for x in (f.side, f.zone) if x)
    parts.append(f"{f.name} ({', '.join(x for x in (where, f.severity) if x)})")
  return "; ".join(parts)


def write_contact_sheet(
  out: str,
  name: str = "phantom_openi",
  split: str = "train",
  n: int = 16,
  size: int = 224,
  start: int = 0,
  seed: int = 0,
  templated_fraction: float | None = None,
  report_chars: int = 260,
) -> list[str]:
  """Renders examples start..start+n-1 of set `name` into a PNG at `out`; returns their ids."""
  cfg = ml_collections.ConfigDict(dict(sets.DEFAULTS))
  cfg.image_size, cfg.phantom_seed = size, seed
  if templated_fraction is not None:
    cfg.templated_fraction = templated_fraction
  source = registry.get_source(name, split, cfg)
  if n < 1 or start < 0 or start + n > len(source):
    raise ValueError(f"--n {n} from --start {start} does not fit {name}/{split} of {len(source)}")
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 5.0 * rows), squeeze=False)
  ids = []
  for k, ax in enumerate(axes.flat):
    ax.axis("off")
    if k >= n:
      continue
    e = source.example(start + k)
    ids.append(e.id)
    ax.imshow(e.phantom.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    title = e.id.split("/", 1)[1]
    if source.class_names is not None:
      title += f"  [{source.class_names[e.label]}]"
    ax.set_title(title, fontsize=7)
    report = e.report if len(e.report) <= report_chars else e.report[:report_chars] + "..."
    text = "\n".join(textwrap.wrap(_finding_line(e), 48)[:3])
    text += "\n\n" + "\n".join(textwrap.wrap(report.replace("\n", " "), 52)[:7])
    ax.text(
      0.0,
      -0.02,
      text,
      transform=ax.transAxes,
      va="top",
      ha="left",
      fontsize=6.2,
      family="monospace",
    )
  fig.suptitle(f"{name} / {split}: {n} phantoms at {size} px", fontsize=11)
  fig.tight_layout(rect=(0, 0, 1, 0.98))
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return ids
