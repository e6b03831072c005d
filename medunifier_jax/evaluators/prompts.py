"""Zero-shot prompt sets: per class, prompts built from severity x subtype x location words.

Two vocabularies, chosen by `config.evals.zero_shot.prompts`:

  paper    the CheXpert class-prompt vocabulary of GLoRIA as the MedUnifier authors' code ships
           it (Atelectasis, Cardiomegaly, Pneumonia, Edema, Pleural Effusion; GLoRIA's
           Consolidation added), and the authors' RSNA Pneumonia / Normal vocabulary. The words
           are data, `class_prompts.json` beside this module, which names its sources and lists
           their quirks (typos and a repeated subtype, kept). Every combination of one word per
           slot, joined in the class's slot order with empty words collapsed, is a candidate;
           `sample_prompts` draws `num_prompts` per class (15 CheXpert, 10 RSNA by default) from
           one `random.Random(seed)` stream in the file's class order, which is how the authors'
           code draws them, so seed 1 gives the authors' prompts. Class sets (`CLASS_SETS`) name
           the classes a data set may have: `pneumonia` (CheXpert / MIMIC 5x200 as the authors
           evaluate them), `gloria` (Consolidation in place of Pneumonia; the phantom 5x200 set),
           `rsna` (Normal / Pneumonia).
  project  the project's own word lists (`PROMPT_WORDS`), phrased like the phantom reports and
           covering every phantom class (pneumothorax and COVID-19 too); `class_prompts` draws
           distinct prompts per class, each class from its own seeded stream.
"""

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import random
from collections.abc import Mapping, Sequence

PROMPT_SETS = ("paper", "project")
VOCABULARY_FILE = pathlib.Path(__file__).with_name("class_prompts.json")
SLOTS = ("severity", "subtype", "location")  # the default join order
PROJECT_NUM_PROMPTS = 5  # prompts per class of the project vocabulary when none is configured


def _key(name: str) -> str:
  """'Pleural_Effusion' -> 'pleural effusion' (how class names are matched)."""
  return " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())


@dataclasses.dataclass(frozen=True)
class PromptClass:
  """One class of a vocabulary: its word slots, in the order they are joined."""

  name: str
  slots: tuple[tuple[str, ...], ...]

  @property
  def num_combinations(self) -> int:
    """Candidates counted with repeats: the product of the slot sizes."""
    return math.prod(len(words) for words in self.slots)

  def combinations(self) -> list[str]:
    """Every candidate prompt in product order (first slot slowest), repeats kept, each joined
    with single spaces (empty words and stray spaces collapse)."""
    return [" ".join(" ".join(words).split()) for words in itertools.product(*self.slots)]


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """A prompt vocabulary: classes in draw order and its default prompts per class."""

  name: str
  source: str
  num_prompts: int
  classes: tuple[PromptClass, ...]

  def find(self, class_name: str) -> PromptClass | None:
    return next((c for c in self.classes if _key(c.name) == _key(class_name)), None)


@dataclasses.dataclass(frozen=True)
class ClassSet:
  """A named set of classes scored with one vocabulary."""

  name: str
  vocabulary: str
  classes: tuple[str, ...]


@functools.cache
def load_vocabulary_file(
  path: str | None = None,
) -> tuple[dict[str, Vocabulary], dict[str, ClassSet]]:
  """(vocabularies, class sets) of `class_prompts.json` (or another file of its layout)."""
  with open(path or VOCABULARY_FILE, encoding="utf-8") as f:
    data = json.load(f)
  vocabularies = {}
  for name, v in data["vocabularies"].items():
    classes = []
    for c in v["classes"]:
      order = tuple(c.get("order", SLOTS))
      if sorted(order) != sorted(SLOTS):
        raise ValueError(f"{name}/{c['name']}: `order` must arrange {SLOTS}, got {order}")
      classes.append(PromptClass(c["name"], tuple(tuple(c[slot]) for slot in order)))
    vocabularies[name] = Vocabulary(name, v["source"], int(v["num_prompts"]), tuple(classes))
  class_sets = {
    name: ClassSet(name, s["vocabulary"], tuple(s["classes"]))
    for name, s in data["class_sets"].items()
  }
  for s in class_sets.values():
    missing = [c for c in s.classes if vocabularies[s.vocabulary].find(c) is None]
    if missing:
      raise ValueError(f"class set {s.name!r}: {missing} not in vocabulary {s.vocabulary!r}")
  return vocabularies, class_sets


def vocabularies() -> dict[str, Vocabulary]:
  return load_vocabulary_file()[0]


def class_sets() -> dict[str, ClassSet]:
  return load_vocabulary_file()[1]


def find_class_set(class_names: Sequence[str]) -> str | None:
  """The name of the class set with exactly these classes (any order), else None."""
  keys = {_key(n) for n in class_names}
  return next((s.name for s in class_sets().values() if {_key(c) for c in s.classes} == keys), None)


def check_class_set(class_names: Sequence[str], expected: str, dataset: str = "") -> None:
  """Raises when a data set has the other class set of `expected`'s vocabulary (say GLoRIA's
  Consolidation set where the paper's Pneumonia set is configured); "" checks nothing.

  Data sets of other classes (RSNA-like, the fine-tuning sets) pass.
  """
  if not expected:
    return
  sets = class_sets()
  if expected not in sets:
    raise ValueError(f"unknown class_set {expected!r}; choose one of {sorted(sets)} or ''")
  found = find_class_set(class_names)
  if (
    found is not None
    and found != expected
    and (sets[found].vocabulary == sets[expected].vocabulary)
  ):
    raise ValueError(
      f"data set {dataset!r} has the {found!r} class set {list(class_names)}, but "
      f"config.evals.zero_shot.class_set is {expected!r} {list(sets[expected].classes)}. "
      f"Read the matching prepared set (e.g. `--class-set {expected}` when preparing, and "
      f"config.data.builder_config={expected}_224px), or set class_set={found!r}."
    )


def vocabulary_for(class_names: Sequence[str]) -> Vocabulary:
  """The paper vocabulary that scores these classes: the one of the class set they form, else
  the first that has all of them; a KeyError lists what exists."""
  found = find_class_set(class_names)
  if found is not None:
    return vocabularies()[class_sets()[found].vocabulary]
  for vocab in vocabularies().values():
    if all(vocab.find(n) is not None for n in class_names):
      return vocab
  known = {v.name: [c.name for c in v.classes] for v in vocabularies().values()}
  raise KeyError(
    f"no paper prompt vocabulary has all of {list(class_names)}; vocabularies: "
    f"{known}. Use config.evals.zero_shot.prompts='project' for other classes."
  )


def sample_prompts(
  vocabulary: Vocabulary, num_prompts: int = 0, seed: int = 1
) -> dict[str, list[str]]:
  """Exactly `num_prompts` (0: the vocabulary's own count) prompts for every class.

  One `random.Random(seed)` stream serves the classes in the vocabulary's order; a class with
  at least `num_prompts` candidates gets a sample without replacement (over candidates, so a
  word listed twice can appear twice), as `random.sample` does in the authors' code. A class
  with fewer gets every candidate once per shuffled pass until the count is reached.
  """
  n = int(num_prompts) or vocabulary.num_prompts
  if n < 1:
    raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
  rng = random.Random(int(seed))
  out = {}
  for cls in vocabulary.classes:
    candidates = cls.combinations()
    picked: list[str] = []
    while len(picked) < n:
      picked += rng.sample(candidates, min(len(candidates), n - len(picked)))
    out[cls.name] = picked
  return out


def paper_class_prompts(
  class_names: Sequence[str], num_prompts: int = 0, seed: int = 1
) -> dict[str, list[str]]:
  """{class name as given: its prompts} from the paper vocabulary that has these classes.

  A class's prompts depend only on (its vocabulary, num_prompts, seed), not on which of the
  vocabulary's classes are asked for.
  """
  vocab = vocabulary_for(class_names)
  drawn = sample_prompts(vocab, num_prompts, seed)
  return {name: drawn[vocab.find(name).name] for name in class_names}


def build_class_prompts(
  prompt_set: str, class_names: Sequence[str], num_prompts: int = 0, seed: int = 1
) -> dict[str, list[str]]:
  """`paper_class_prompts` or the project's `class_prompts`, by `prompt_set` (`PROMPT_SETS`)."""
  if prompt_set == "paper":
    return paper_class_prompts(class_names, num_prompts, seed)
  if prompt_set == "project":
    return class_prompts(class_names, int(num_prompts) or PROJECT_NUM_PROMPTS, seed)
  raise ValueError(f"unknown prompt set {prompt_set!r}; choose one of {PROMPT_SETS}")


# The lobes in location phrases (consolidation and pneumonia name all four).
_LOBES = (
  "in the right lower lobe",
  "in the left lower lobe",
  "in the right upper lobe",
  "in the left upper lobe",
)
# The project vocabulary (prompts="project"). Each class: severity, subtype and location phrases
# ("" means the slot is left out).
PROMPT_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
  "atelectasis": {
    "severity": ("", "mild", "minimal", "subtle", "moderate"),
    "subtype": (
      "atelectasis",
      "subsegmental atelectasis",
      "linear atelectasis",
      "bibasilar atelectasis",
      "plate-like atelectasis",
      "bandlike atelectasis",
      "retrocardiac atelectasis",
    ),
    "location": (
      "",
      "at the lung bases",
      "at the right lung base",
      "at the left lung base",
      "at the mid lung zone",
      "in the right lower lobe",
      "in the left lower lobe",
    ),
  },
  "cardiomegaly": {
    # No severity slot: "marked heart size is enlarged" or "moderate enlarged heart size" read
    # like no report, and the model scores them nearer lung opacities than enlarged hearts. With
    # the slot, the demo's cardiomegaly images were named Cardiomegaly 6% of the time on the
    # phantom 5x200 validation split; without it 33% (overall 0.350 -> 0.373, max pooling).
    "severity": ("",),
    "subtype": (
      "cardiomegaly",
      "enlargement of the cardiac silhouette",
      "enlarged cardiac silhouette",
      "enlarged heart size",
      "heart size is enlarged",
      "prominent cardiac silhouette",
    ),
    "location": ("",),
  },
  "consolidation": {
    "severity": ("", "increased", "patchy", "dense", "focal", "new"),
    "subtype": (
      "consolidation",
      "airspace consolidation",
      "lobar consolidation",
      "retrocardiac consolidation",
      "confluent consolidation",
    ),
    "location": (
      "",
      *_LOBES,
      "at the right lung base",
      "at the left lung base",
      "in the lower lung zone",
    ),
  },
  "edema": {
    "severity": ("", "mild", "moderate", "severe", "persistent", "worsening"),
    "subtype": (
      "pulmonary edema",
      "interstitial edema",
      "interstitial pulmonary edema",
      "perihilar edema",
      "alveolar edema",
      "edema with vascular congestion",
    ),
    "location": ("", "bilaterally", "in both lungs"),
  },
  "pleural effusion": {
    "severity": ("", "small", "moderate", "large", "trace", "increased"),
    "subtype": (
      "pleural effusion",
      "right pleural effusion",
      "left pleural effusion",
      "bilateral pleural effusions",
      "layering pleural effusion",
      "subpulmonic pleural effusion",
    ),
    "location": ("", "with blunting of the costophrenic angle", "at the lung base"),
  },
  "pneumonia": {
    "severity": ("", "early", "focal", "multifocal", "patchy", "round"),
    "subtype": (
      "pneumonia",
      "airspace opacity concerning for pneumonia",
      "consolidation consistent with pneumonia",
      "infectious opacity",
      "bacterial pneumonia",
    ),
    "location": ("", *_LOBES, "at the lung bases", "in the mid lung zone"),
  },
  "pneumothorax": {
    "severity": ("", "small", "moderate", "large", "apical", "tension"),
    "subtype": (
      "pneumothorax",
      "visible pleural line with pneumothorax",
      "pneumothorax with absent lung markings",
    ),
    "location": ("", "on the right", "on the left", "at the apex"),
  },
  "covid 19": {
    "severity": ("", "mild", "moderate", "extensive", "multifocal"),
    "subtype": (
      "bilateral peripheral ground-glass opacities",
      "peripheral opacities typical of covid-19",
      "bilateral patchy peripheral opacities consistent with covid-19",
      "ground-glass opacities compatible with viral pneumonia",
    ),
    "location": ("", "in both lower lungs", "in the lung periphery"),
  },
  "normal": {
    "severity": ("",),
    "subtype": (
      "no acute cardiopulmonary process",
      "the lungs are clear",
      "no focal consolidation, effusion or pneumothorax",
      "normal heart size and clear lungs",
      "no acute abnormality",
      "normal chest radiograph",
      "heart and lungs are within normal limits",
      "no evidence of acute disease",
    ),
    "location": ("",),
  },
}

# Class-name spellings that data sets use for the same project prompt set.
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
  """'Pleural_Effusion' -> 'pleural effusion'; raises for a class without a project prompt set."""
  key = _key(name)
  key = ALIASES.get(key, key)
  if key not in PROMPT_WORDS:
    raise KeyError(
      f"no zero-shot prompt words for class {name!r}; known classes: "
      f"{sorted(PROMPT_WORDS)} (aliases: {sorted(ALIASES)}). Add an entry to "
      "medunifier_jax/evaluators/prompts.py:PROMPT_WORDS."
    )
  return key


def all_prompts(words: Mapping[str, Sequence[str]]) -> list[str]:
  """Every severity x subtype x location combination, in a fixed order."""
  prompts = []
  for sev, sub, loc in itertools.product(words["severity"], words["subtype"], words["location"]):
    text = " ".join(part for part in (sev, sub, loc) if part)
    if text not in prompts:
      prompts.append(text)
  return prompts


def class_prompts(
  class_names: Sequence[str],
  num_prompts: int,
  seed: int = 0,
  words: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> dict[str, list[str]]:
  """The project vocabulary: `num_prompts` distinct prompts per class (all if fewer exist).

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
    out[name] = (
      candidates if len(candidates) <= num_prompts else rng.sample(candidates, num_prompts)
    )
  return out
