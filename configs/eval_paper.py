r"""The paper's benchmark rows on the real data sets (prepared with medunifier_jax.data.prepare).

Variants (one per benchmark row; `all` runs every row):
  covidx_finetune           COVIDx, fine-tuned classification (paper: accuracy 93.5)
  siim_finetune             SIIM-ACR Pneumothorax, fine-tuned (paper: AUC 94.8)
  rsna_finetune             RSNA Pneumonia, fine-tuned (paper: AUROC 91.7)
  mimic_report_gen          MIMIC-CXR test split, report generation (paper: BLEU-4 12.9)
  mimic_5x200_zero_shot     MIMIC 5x200 zero-shot classification (paper: accuracy 50.4)
  chexpert_5x200_zero_shot  CheXpert 5x200 zero-shot classification (paper: accuracy 43.5)
  mimic_5x200_retrieval     MIMIC 5x200 retrieval (paper: P@1 60.7 image->text, 63.1 text->image)
  rsna_zero_shot            RSNA zero-shot Pneumonia vs Normal (AUC)
  all                       every row above

The model and the protocol settings are the paper variant's (configs/pretrain.py); each row
runs one evaluator on one data set. Every data set is read from
`config.data.data_dir`. The 5x200 rows default to GLoRIA's class set; set
`--config.data.builder_config=pneumonia_224px` for the paper's code's set (Pneumonia in place of
Consolidation), after preparing it with `--class-set pneumonia`.

  python -m medunifier_jax.evaluate --config configs/eval_paper.py:all --workdir WORKDIR \
      --config.data.data_dir=/data/tfds
"""

from pathlib import Path

import ml_collections

from medunifier_jax import config_lib

# By file path, so the config loads from any working directory (configs/ is not a package).
pretrain = config_lib.load_module(Path(__file__).with_name("pretrain.py"))

# Benchmark row -> (entry of the paper variant's config.evals, data set, overrides).
ROWS = {
  "covidx_finetune": ("finetune", "covidx", dict(select_metric="accuracy")),
  "siim_finetune": ("finetune", "siim_pneumothorax", {}),
  "rsna_finetune": ("finetune", "rsna_pneumonia", {}),
  "mimic_report_gen": ("report_gen", "mimic_cxr", {}),
  "mimic_5x200_zero_shot": ("zero_shot", "mimic_5x200", {}),
  "chexpert_5x200_zero_shot": ("zero_shot", "chexpert_5x200", {}),
  "mimic_5x200_retrieval": ("retrieval", "mimic_5x200", dict(itm_rerank_k=256)),
  "rsna_zero_shot": ("zero_shot", "rsna_pneumonia", {}),
}
VARIANTS = (*ROWS, "all")


def _row(name: str, paper_evals: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  entry, dataset, overrides = ROWS[name]
  cfg = ml_collections.ConfigDict(paper_evals[entry].to_dict())
  cfg.task = entry
  cfg.datasets = (dataset,)
  cfg.periodic = False
  cfg.update(overrides)
  return cfg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = config_lib.select_variant(arg, VARIANTS, default="all")
  config = pretrain.get_config("paper")
  paper_evals = config.evals
  config.unlock()
  config.eval_variant = variant
  rows = tuple(ROWS) if variant == "all" else (variant,)
  config.evals = ml_collections.ConfigDict({row: _row(row, paper_evals) for row in rows})
  config_lib.derive(config)  # the report row's max_length follows model.max_text_len again
  config.lock()
  return config
