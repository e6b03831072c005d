r"""Images from reports: the command-line face of `api.Model.generate_images`.

  python -m medunifier_jax.generate --workdir W --prompt "Large right pleural effusion." \
      --num 8 --out W/generated [--prompt "No acute findings." ...] [--guidance 1.0 --steps 12
      --temperature 0.8 --candidates 2 --seed 0 --prior DIR]

Loads the MedUnifier of W with the prior trained on its codes (`W/prior`, or `--prior DIR`;
configs/prior.py says how to train one), draws `--num` images per prompt and writes
`OUT/prompt{p}_sample{s}.png` for each and `OUT/grid.png` (one row per prompt), plus
`OUT/prompts.json` naming the prompt of each row and the decoding settings. Relative paths are
resolved against the current directory.

This module only parses the flags; the work is `medunifier_jax.prior.export`'s.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from medunifier_jax import compilation_cache, host_memory
from medunifier_jax.prior import export

_WORKDIR = flags.DEFINE_string("workdir", None, "The MedUnifier's training workdir.")
_PROMPT = flags.DEFINE_multi_string(
  "prompt", None, "A report to draw images for; repeat the flag for several."
)
_NUM = flags.DEFINE_integer("num", 4, "Images per prompt.")
_OUT = flags.DEFINE_string("out", None, "Folder for the PNG files (created).")
_STEPS = flags.DEFINE_integer(
  "steps", None, "Parallel decoding steps (default: the prior config's, 12)."
)
_GUIDANCE = flags.DEFINE_float(
  "guidance",
  None,
  "Classifier-free guidance weight: logits = "
  "cond + g (cond - uncond); 0 = conditional only (default: the "
  "prior config's).",
)
_TEMPERATURE = flags.DEFINE_float(
  "temperature", None, "Sampling temperature of the codes (default: the prior config's)."
)
_CANDIDATES = flags.DEFINE_integer(
  "candidates",
  None,
  "Draws per image: keep the one the MedUnifier's image-text matching head scores highest "
  "against the prompt; 1 = the first draw (default: the prior config's).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same images.")
_PRIOR = flags.DEFINE_string(
  "prior", None, "The prior's training workdir (default: WORKDIR/prior)."
)
flags.mark_flags_as_required(["workdir", "prompt", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}; pass each prompt with --prompt")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  compilation_cache.enable()
  from medunifier_jax import api, paths

  if _NUM.value < 1:
    raise app.UsageError("--num must be at least 1")
  try:
    model = api.load(
      paths.resolve(_WORKDIR.value), prior=paths.resolve(_PRIOR.value) if _PRIOR.value else None
    )
    written = export.generate(
      model,
      _PROMPT.value,
      _OUT.value,
      num=_NUM.value,
      steps=_STEPS.value,
      guidance=_GUIDANCE.value,
      temperature=_TEMPERATURE.value,
      candidates=_CANDIDATES.value,
      seed=_SEED.value,
    )
  except (FileNotFoundError, ValueError) as e:
    # A workdir without a checkpoint or without a prior: one message, no traceback.
    raise SystemExit(f"generate: {e}") from None
  print(f"wrote {len(written) - 1} images and {written[-1]}", file=sys.stderr)


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()
  app.run(main)
