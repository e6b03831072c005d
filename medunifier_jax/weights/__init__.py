"""Weight import from Hugging Face folders (BLIP-2, BERT) with checked, listed errors."""

from medunifier_jax.weights.hf_files import read_config, read_weights
from medunifier_jax.weights.hf_import import (
    BERT_NOT_IN_CHECKPOINT,
    BLIP2_NOT_IN_CHECKPOINT,
    bert_config,
    blip2_config,
    import_bert,
    import_blip2,
)
from medunifier_jax.weights.mapping import ImportReport, Rule, WeightImportError, assign

__all__ = [
    "BERT_NOT_IN_CHECKPOINT",
    "BLIP2_NOT_IN_CHECKPOINT",
    "ImportReport",
    "Rule",
    "WeightImportError",
    "assign",
    "bert_config",
    "blip2_config",
    "import_bert",
    "import_blip2",
    "read_config",
    "read_weights",
]
