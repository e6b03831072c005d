r"""How learnable are the pre-training images for the configured ViT? A supervised reference.

  python -m medunifier_jax.supervised_reference --config configs/pretrain.py:demo \
      --workdir /tmp/supervised [--config.num_steps=600] [--eval_every=100]

Trains the configuration's image encoder from scratch, with a linear head on its mean-pooled
tokens, directly on the pre-training data's finding labels (multi-label cross-entropy), with
the configuration's optimiser, batch size and step count. Prints the validation-split AUC of
every finding every `--eval_every` steps, and writes the last ones to WORKDIR/supervised.json.

Pre-training never sees these labels: it learns the same encoder from the reports alone. This
run is the upper reference for what the encoder can pick up from the same images in the same
number of steps; the demo's fine-tuned figures (`medunifier_jax.demo`) sit below it.

This module only parses the flags; the work is `medunifier_jax.supervised`'s.
"""

from absl import app, flags
from ml_collections import config_flags

from medunifier_jax import compilation_cache, host_memory, supervised

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "e.g. configs/pretrain.py:demo", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the tokenizer and results go.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Steps between validation AUCs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compilation_cache.enable()
  supervised.run(_CONFIG.value, _WORKDIR.value, _EVAL_EVERY.value)


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()
  app.run(main)
