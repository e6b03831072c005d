r"""Prepare a real data set: read its published files, write ArrayRecord files for training.

  python -m medunifier_jax.data.prepare NAME --manual-dir DIR --data-dir DIR [--image-size N]
      [--class-set SET] [--seed S] [--per-class N] [--held-out PATH|none] [--threads T]
      [--overwrite]

NAME is one of mimic_cxr, open_i, chexpert_5x200, mimic_5x200, rsna_pneumonia,
siim_pneumothorax, covidx (docs/DATASETS.md gives each one's download and layout). A progress
bar runs per split; the summary lists the examples per split, what the builder held out or
where it read from, and every skipped input with the reason. Output: DATA_DIR/NAME/CONFIG/1.0.0/
with the ArrayRecord files, dataset_info.json, manifest.csv (the split or sample definition),
skipped.csv and fingerprint.json (plus held_out.csv for the 5x200 sets, excluded.csv for
mimic_cxr).

mimic_cxr holds the patients of the MIMIC 5x200 evaluation set out of its train and validation
splits: those of every mimic_5x200 prepared under the same --data-dir (prepare it first), plus
any named with --held-out PATH. With none found it stops and says how to go on; `--held-out
none` pre-trains on every study (docs/DATASETS.md, "Held out of pre-training").

A data set already prepared with the same options by the same code (same fingerprint: format
versions, options, report cleaning rule) is not rebuilt; its summary is read back. One whose
fingerprint differs is refused with the command that rebuilds it (`--overwrite`, which replaces
it; the old files are kept until the new build succeeds). Errors (a wrong or empty manual
directory, a label file with an unknown header or in another encoding than UTF-8, a stale
prepared set) end in one message and exit status 2.

This module only holds the program's flags; the work is `medunifier_jax.data.preparation`'s.
"""

from absl import app, flags

from medunifier_jax.data import preparation

# Defined by the library, which also parses them for in-process runs (`run_command`): one
# definition of the command line. Adopted so that --help lists them as this program's.
_OPTIONS = preparation.define_flags()
flags.adopt_module_key_flags(preparation)


def main(argv: list[str]) -> int:
  # argv[1:] is the data set name: absl leaves arguments that are not flags in argv.
  return preparation.run(argv[1:], _OPTIONS)


if __name__ == "__main__":
  app.run(main)
