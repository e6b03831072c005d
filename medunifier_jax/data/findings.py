"""The finding vocabulary shared by every data set: names, label order and class tuples.

`FINDINGS` fixes the order of the `labels` vector (float32 (F,), F = len(FINDINGS)) that every
source returns: CheXpert-style 1 (present) / 0 (absent or not mentioned). Names follow the
CheXpert observation names where both exist, so real-data builders map columns by name.
"""

from collections.abc import Iterable, Mapping

import numpy as np

FINDINGS: tuple[str, ...] = (
  "No Finding",
  "Atelectasis",
  "Cardiomegaly",
  "Consolidation",
  "Edema",
  "Pleural Effusion",
  "Pneumonia",
  "Pneumothorax",
  "Nodule",
  "Calcified Granuloma",
  "Support Devices",
  "COVID-19",
)
NUM_FINDINGS = len(FINDINGS)
FINDING_INDEX: Mapping[str, int] = {name: i for i, name in enumerate(FINDINGS)}

# Zero-shot / retrieval classes (GLoRIA / MGCA 5x200 convention).
CLASSES_5X200: tuple[str, ...] = (
  "Atelectasis",
  "Cardiomegaly",
  "Consolidation",
  "Edema",
  "Pleural Effusion",
)
# Binary and 3-class fine-tuning sets; index 0 is the negative class.
CLASSES_PNEUMONIA: tuple[str, ...] = ("Normal", "Pneumonia")  # RSNA-like
CLASSES_PNEUMOTHORAX: tuple[str, ...] = ("No Pneumothorax", "Pneumothorax")  # SIIM-like
CLASSES_COVIDX: tuple[str, ...] = ("Normal", "Pneumonia", "COVID-19")  # COVIDx-like

# Our findings without a CheXpert / MIMIC-CXR label column (Open-i MeSH terms, COVID-19).
NOT_IN_CHEXPERT: tuple[str, ...] = ("Nodule", "Calcified Granuloma", "COVID-19")
# CheXpert / MIMIC-CXR label columns that are the same observation as one of ours: every other
# finding, under the same name.
CHEXPERT_COLUMNS: Mapping[str, str] = {
  name: name for name in FINDINGS if name not in NOT_IN_CHEXPERT
}


def finding_index(name: str) -> int:
  """Position of `name` in `FINDINGS`; raises a KeyError listing the known names."""
  try:
    return FINDING_INDEX[name]
  except KeyError:
    raise KeyError(f"unknown finding {name!r}; known findings: {', '.join(FINDINGS)}") from None


# As in CheXpert, devices alone do not make a study abnormal: "No Finding" ignores them.
NOT_PATHOLOGY: tuple[str, ...] = ("Support Devices",)


def labels_from_names(names: Iterable[str]) -> np.ndarray:
  """1/0 label vector float32 (F,) for the given positive finding names.

  "No Finding" is 1 exactly when no pathology is positive (`NOT_PATHOLOGY` does not count).
  """
  labels = np.zeros(NUM_FINDINGS, np.float32)
  for name in names:
    labels[finding_index(name)] = 1.0
  pathology = [i for i, n in enumerate(FINDINGS) if n != "No Finding" and n not in NOT_PATHOLOGY]
  labels[FINDING_INDEX["No Finding"]] = 0.0 if labels[pathology].any() else 1.0
  return labels


def names_from_labels(labels: np.ndarray) -> tuple[str, ...]:
  """Positive finding names, in `FINDINGS` order, of a label vector (F,)."""
  labels = np.asarray(labels)
  if labels.shape != (NUM_FINDINGS,):
    raise ValueError(
      f"labels must have shape ({NUM_FINDINGS},) in FINDINGS order, got {labels.shape}"
    )
  return tuple(name for name, v in zip(FINDINGS, labels) if v > 0.5)
