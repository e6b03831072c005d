"""A PNG contact sheet of phantoms with their labels and report excerpts, to look at.

  python -m medunifier_jax.data.contact_sheet --out sheet.png [--set NAME] [--n 16] [--size 224]

Each cell shows the image, its positive labels (with side / severity) and the start of its
report. Any registered phantom set works (`--set`, default phantom_openi); `--split`, `--start`
and `--seed` pick which examples.

This module only parses the flags; the drawing is `medunifier_jax.data.rendering`'s.
"""

from absl import app, flags

from medunifier_jax.data import rendering, sets

_OUT = flags.DEFINE_string("out", None, "PNG file to write.")
_SET = flags.DEFINE_string("set", "phantom_openi", "Registered phantom data set name.")
_SPLIT = flags.DEFINE_enum("split", "train", sorted(sets.SPLITS), "Split to draw from.")
_N = flags.DEFINE_integer("n", 16, "Number of phantoms.")
_SIZE = flags.DEFINE_integer("size", 224, "Image size in pixels.")
_START = flags.DEFINE_integer("start", 0, "First example index.")
_SEED = flags.DEFINE_integer("seed", 0, "data.phantom_seed.")
# Hyphenated as it always was: absl accepts hyphens in flag names.
_TEMPLATED_FRACTION = flags.DEFINE_float(
  "templated-fraction",
  None,
  "phantom_openi: share of templated reports (default: the config default).",
)
flags.mark_flag_as_required("out")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  ids = rendering.write_contact_sheet(
    _OUT.value,
    _SET.value,
    _SPLIT.value,
    _N.value,
    _SIZE.value,
    _START.value,
    _SEED.value,
    _TEMPLATED_FRACTION.value,
  )
  print(f"wrote {_OUT.value}: {len(ids)} phantoms of {_SET.value}/{_SPLIT.value}")


if __name__ == "__main__":
  app.run(main)
