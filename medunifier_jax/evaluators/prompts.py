"""Zero-shot prompt sets: severity x subtype x location word lists per class.

The construction follows GLoRIA / MedCLIP: every combination of one severity, one subtype and
one location word is a candidate prompt, and a fixed number is sampled per class with a seeded
generator, so a prompt set is reproducible from (class names, n, seed).
"""

import itertools
import random
from collections.abc import Mapping, Sequence

# Each class: severity, subtype and location phrases ("" means the slot is left out).
PROMPT_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "atelectasis": {
        "severity": ("", "mild", "minimal", "subtle", "moderate"),
        "subtype": ("atelectasis", "subsegmental atelectasis", "linear atelectasis",
                    "bibasilar atelectasis", "plate-like atelectasis", "bandlike atelectasis",
                    "retrocardiac atelectasis"),
        "location": ("", "at the lung bases", "at the right lung base", "at the left lung base",
                     "at the mid lung zone", "in the right lower lobe", "in the left lower lobe"),
    },
    "cardiomegaly": {
        "severity": ("", "mild", "moderate", "marked", "stable"),
        "subtype": ("cardiomegaly", "enlargement of the cardiac silhouette",
                    "enlarged cardiac silhouette", "enlarged heart size",
                    "heart size is enlarged", "prominent cardiac silhouette"),
        "location": ("",),
    },
    "consolidation": {
        "severity": ("", "increased", "patchy", "dense", "focal", "new"),
        "subtype": ("consolidation", "airspace consolidation", "lobar consolidation",
                    "retrocardiac consolidation", "confluent consolidation"),
        "location": ("", "in the right lower lobe", "in the left lower lobe",
                     "in the right upper lobe", "in the left upper lobe", "at the right lung base",
                     "at the left lung base", "in the lower lung zone"),
    },
    "edema": {
        "severity": ("", "mild", "moderate", "severe", "persistent", "worsening"),
        "subtype": ("pulmonary edema", "interstitial edema", "interstitial pulmonary edema",
                    "perihilar edema", "alveolar edema", "edema with vascular congestion"),
        "location": ("", "bilaterally", "in both lungs"),
    },
    "pleural effusion": {
        "severity": ("", "small", "moderate", "large", "trace", "increased"),
        "subtype": ("pleural effusion", "right pleural effusion", "left pleural effusion",
                    "bilateral pleural effusions", "layering pleural effusion",
                    "subpulmonic pleural effusion"),
        "location": ("", "with blunting of the costophrenic angle", "at the lung base"),
    },
    "pneumonia": {
        "severity": ("", "early", "focal", "multifocal", "patchy", "round"),
        "subtype": ("pneumonia", "airspace opacity concerning for pneumonia",
                    "consolidation consistent with pneumonia", "infectious opacity",
                    "bacterial pneumonia"),
        "location": ("", "in the right lower lobe", "in the left lower lobe",
                     "in the right upper lobe", "in the left upper lobe", "at the lung bases",
                     "in the mid lung zone"),
    },
    "pneumothorax": {
        "severity": ("", "small", "moderate", "large", "apical", "tension"),
        "subtype": ("pneumothorax", "visible pleural line with pneumothorax",
                    "pneumothorax with absent lung markings"),
        "location": ("", "on the right", "on the left", "at the apex"),
    },
    "covid 19": {
        "severity": ("", "mild", "moderate", "extensive", "multifocal"),
        "subtype": ("bilateral peripheral ground-glass opacities",
                    "peripheral opacities typical of covid-19",
                    "bilateral patchy peripheral opacities consistent with covid-19",
                    "ground-glass opacities compatible with viral pneumonia"),
        "location": ("", "in both lower lungs", "in the lung periphery"),
    },
    "normal": {
        "severity": ("",),
        "subtype": ("no acute cardiopulmonary process", "the lungs are clear",
                    "no focal consolidation, effusion or pneumothorax",
                    "normal heart size and clear lungs", "no acute abnormality",
                    "normal chest radiograph", "heart and lungs are within normal limits",
                    "no evidence of acute disease"),
        "location": ("",),
    },
}

# Class-name spellings that data sets use for the same prompt set.
ALIASES = {
    "effusion": "pleural effusion",
    "no finding": "normal",
    "no_finding": "normal",
    "no pneumothorax": "normal",
    "covid": "covid 19",
    "healthy": "normal",
    "negative": "normal",
    "lung opacity": "pneumonia",
}


def canonical_class(name: str) -> str:
  """'Pleural_Effusion' -> 'pleural effusion'; raises for a class without a prompt set."""
  key = " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())
  key = ALIASES.get(key, key)
  if key not in PROMPT_WORDS:
    raise KeyError(f"no zero-shot prompt words for class {name!r}; known classes: "
                   f"{sorted(PROMPT_WORDS)} (aliases: {sorted(ALIASES)}). Add an entry to "
                   "medunifier_jax/evaluators/prompts.py:PROMPT_WORDS.")
  return key


def all_prompts(words: Mapping[str, Sequence[str]]) -> list[str]:
  """Every severity x subtype x location combination, in a fixed order."""
  prompts = []
  for sev, sub, loc in itertools.product(words["severity"], words["subtype"], words["location"]):
    text = " ".join(part for part in (sev, sub, loc) if part)
    if text not in prompts:
      prompts.append(text)
  return prompts


def class_prompts(class_names: Sequence[str], num_prompts: int, seed: int = 0,
                  words: Mapping[str, Mapping[str, Sequence[str]]] | None = None
                  ) -> dict[str, list[str]]:
  """Samples `num_prompts` distinct prompts per class (all of them if fewer exist).

  The sample for a class depends only on (its word lists, num_prompts, seed), not on which other
  classes are asked for, so the same class gets the same prompts in every task.
  """
  if num_prompts < 1:
    raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
  words = PROMPT_WORDS if words is None else words
  out = {}
  for name in class_names:
    key = canonical_class(name) if words is PROMPT_WORDS else name
    candidates = all_prompts(words[key])
    rng = random.Random(f"{seed}:{key}")
    out[name] = (candidates if len(candidates) <= num_prompts
                 else rng.sample(candidates, num_prompts))
  return out
