"""Weight import: Hugging Face folders (BLIP-2, BERT), the paper's code's `.pth` files (EVA ViT-g,
BLIP-2), several sources for the parts of one model (`init_sources`), all with checked, listed
errors."""

from medunifier_jax.weights.hf_files import read_config, read_weights
from medunifier_jax.weights.hf_import import (
  BERT_NOT_IN_CHECKPOINT,
  BLIP2_NOT_IN_CHECKPOINT,
  bert_config,
  blip2_config,
  import_bert,
  import_blip2,
)
from medunifier_jax.weights.init_sources import InitReport, PlaceholderError, import_sources
from medunifier_jax.weights.lavis import (
  LAVIS_BLIP2_NOT_IN_CHECKPOINT,
  LAVIS_EVA_NOT_IN_CHECKPOINT,
  read_pth,
)
from medunifier_jax.weights.mapping import ImportReport, Rule, WeightImportError, assign

__all__ = [
  "BERT_NOT_IN_CHECKPOINT",
  "BLIP2_NOT_IN_CHECKPOINT",
  "LAVIS_BLIP2_NOT_IN_CHECKPOINT",
  "LAVIS_EVA_NOT_IN_CHECKPOINT",
  "ImportReport",
  "InitReport",
  "PlaceholderError",
  "Rule",
  "WeightImportError",
  "assign",
  "bert_config",
  "blip2_config",
  "import_bert",
  "import_blip2",
  "import_sources",
  "read_config",
  "read_pth",
  "read_weights",
]
