"""The paper's zero-shot prompts: the vocabulary as data, the seeded sampler, the class sets, and
the class scores (pooled raw similarities, softmax over classes). No model is built here."""

import collections
import itertools
import json
import math
import random

import numpy as np
import pytest

from medunifier_jax.evaluators import common, prompts, zero_shot

FIVE_BY_200 = ["Atelectasis", "Cardiomegaly", "Pneumonia", "Edema", "Pleural Effusion"]


@pytest.fixture(scope="module")
def raw():
  with open(prompts.VOCABULARY_FILE, encoding="utf-8") as f:
    return json.load(f)


def test_vocabulary_sizes_follow_the_json(raw):
  # Combinations per class, counted from the file itself (repeats included).
  counted = {
    (v, c["name"]): math.prod(len(c[s]) for s in prompts.SLOTS)
    for v, vocab in raw["vocabularies"].items()
    for c in vocab["classes"]
  }
  assert counted == {
    ("chexpert", "Atelectasis"): 3 * 7 * 10,
    ("chexpert", "Cardiomegaly"): 15,
    ("chexpert", "Pneumonia"): 6 * 3 * 13,
    ("chexpert", "Edema"): 6 * 3,
    ("chexpert", "Pleural Effusion"): 6 * 3 * 3,
    ("chexpert", "Consolidation"): 4 * 6 * 8,
    ("rsna", "Pneumonia"): 14 * 3,
    ("rsna", "Normal"): 3 * 9,
  }
  for name, vocab in prompts.vocabularies().items():
    for cls in vocab.classes:
      assert cls.num_combinations == len(cls.combinations()) == counted[(name, cls.name)]
  # The repeated Pleural Effusion subtype is kept: 54 candidates, 36 distinct texts.
  effusion = prompts.vocabularies()["chexpert"].find("Pleural Effusion").combinations()
  assert len(set(effusion)) == 36


def test_class_sets_are_the_files(raw):
  sets = prompts.class_sets()
  assert {n: (s.vocabulary, list(s.classes)) for n, s in sets.items()} == {
    n: (s["vocabulary"], s["classes"]) for n, s in raw["class_sets"].items()
  }
  assert sorted(sets["pneumonia"].classes) == sorted(FIVE_BY_200)
  assert "Consolidation" in sets["gloria"].classes and "Pneumonia" not in sets["gloria"].classes
  assert (
    prompts.find_class_set(
      ["Pleural_Effusion", "edema", "Pneumonia", "Cardiomegaly", "Atelectasis"]
    )
    == "pneumonia"
  )
  assert prompts.find_class_set(["Normal", "Pneumonia"]) == "rsna"
  assert prompts.find_class_set(["Atelectasis"]) is None


def test_prompts_are_joined_in_slot_order_with_single_spaces():
  vocab = prompts.vocabularies()
  for v in vocab.values():
    for cls in v.classes:
      for text in cls.combinations():
        assert text == " ".join(text.split()) and text
  # The authors' join orders: effusion ends with its location, RSNA pneumonia with the subtype.
  effusion = vocab["chexpert"].find("Pleural Effusion").combinations()
  assert effusion[0] == "bilateral pleural effusion left"
  assert all(t.split()[-1] in ("left", "right", "tiny") for t in effusion)
  assert all(t.endswith("pneumonia") for t in vocab["rsna"].find("Pneumonia").combinations())
  assert (
    "round mycoplasma at the mid lung zone" in vocab["chexpert"].find("Pneumonia").combinations()
  )


def test_sampler_is_seeded_and_draws_exactly_fifteen():
  a = prompts.paper_class_prompts(FIVE_BY_200, 15, seed=1)
  assert a == prompts.paper_class_prompts(FIVE_BY_200, 15, seed=1)
  assert a != prompts.paper_class_prompts(FIVE_BY_200, 15, seed=2)
  vocab = prompts.vocabularies()["chexpert"]
  for name, texts in a.items():
    assert len(texts) == 15
    # Without replacement over candidates: no text more often than the vocabulary lists it.
    listed = collections.Counter(vocab.find(name).combinations())
    assert all(count <= listed[t] for t, count in collections.Counter(texts).items())
  # A class's draw does not depend on which classes are asked for; the default count is 15.
  assert prompts.paper_class_prompts(["Edema"], 0, seed=1) == {"Edema": a["Edema"]}
  assert (
    prompts.paper_class_prompts(["pleural_effusion"], 15, seed=1)["pleural_effusion"]
    == (a["Pleural Effusion"])
  )


def test_seed_one_gives_the_authors_draw(raw):
  """The authors' procedure written out: Python's random seeded with 1, one sample of 15
  f"{a} {b} {c}" strings per class in file order (here: the five classes they have)."""
  rng = random.Random(1)
  expected = {}
  for c in raw["vocabularies"]["chexpert"]["classes"]:
    slots = [c[s] for s in c.get("order", prompts.SLOTS)]
    drawn = rng.sample([f"{x} {y} {z}" for x, y, z in itertools.product(*slots)], 15)
    expected[c["name"]] = [" ".join(t.split()) for t in drawn]
  assert prompts.paper_class_prompts(FIVE_BY_200, 15, seed=1) == {
    n: expected[n] for n in FIVE_BY_200
  }


def test_classes_with_fewer_candidates_are_filled_evenly():
  cardiomegaly = prompts.vocabularies()["chexpert"].find("Cardiomegaly")  # 15 candidates
  drawn = prompts.paper_class_prompts(["Cardiomegaly"], 20, seed=0)["Cardiomegaly"]
  counts = collections.Counter(drawn)
  assert len(drawn) == 20 and set(counts) == set(cardiomegaly.combinations())
  assert sorted(counts.values()) == [1] * 10 + [2] * 5


def test_class_set_check_and_vocabulary_choice():
  gloria = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
  with pytest.raises(ValueError, match="class_set=.gloria."):
    prompts.check_class_set(gloria, "pneumonia", "chexpert_5x200")
  prompts.check_class_set(gloria, "gloria")
  prompts.check_class_set(gloria, "")
  prompts.check_class_set(["Normal", "Pneumonia"], "pneumonia")  # another vocabulary's set
  with pytest.raises(ValueError, match="unknown class_set"):
    prompts.check_class_set(gloria, "chexpert")
  assert prompts.vocabulary_for(["Normal", "Pneumonia"]).name == "rsna"
  assert prompts.vocabulary_for(gloria).name == "chexpert"
  assert len(prompts.paper_class_prompts(["Normal", "Pneumonia"])["Normal"]) == 10
  with pytest.raises(KeyError, match="prompts='project'"):
    prompts.paper_class_prompts(["No Pneumothorax", "Pneumothorax"])
  # The project vocabulary stays available and covers every phantom class.
  project = prompts.build_class_prompts("project", ["No Pneumothorax", "Pneumothorax"], 0, 0)
  assert all(len(v) == prompts.PROJECT_NUM_PROMPTS for v in project.values())
  with pytest.raises(ValueError, match="unknown prompt set"):
    prompts.build_class_prompts("gloria", gloria)


def test_class_scores_pool_raw_similarities_then_softmax():
  sim = np.array([[0.9, 0.1, 0.3, 0.2, 0.0], [0.0, 0.2, 0.4, 0.8, 0.6]])  # 2 images x 5 prompts
  owner = np.array([0, 0, 1, 1, 1])  # class 0 owns 2 prompts, class 1 owns 3
  np.testing.assert_allclose(
    zero_shot.pool_prompt_scores(sim, owner, 2, "max"), [[0.9, 0.3], [0.2, 0.8]]
  )
  mean = zero_shot.pool_prompt_scores(sim, owner, 2, "mean")
  np.testing.assert_allclose(mean, [[0.5, 0.5 / 3], [0.1, 0.6]])
  probs = zero_shot.class_probabilities(sim, owner, 2, "mean")
  expected = np.exp(mean) / np.exp(mean).sum(axis=1, keepdims=True)  # no temperature
  np.testing.assert_allclose(probs, expected)
  with pytest.raises(ValueError, match="prompt_pooling"):
    zero_shot.pool_prompt_scores(sim, owner, 2, "sum")


def test_setting_choice_names_the_setting_and_its_choices():
  cfg = {"prompt_pooling": "sum"}
  assert common.setting_choice(cfg, "zero_shot", "prompts", "paper", ("paper",)) == "paper"
  with pytest.raises(
    ValueError,
    match=r"zero_shot\.prompt_pooling is 'sum'; choose one of "
    r"\('max', 'mean'\)",
  ):
    common.setting_choice(cfg, "zero_shot", "prompt_pooling", "max", zero_shot.POOLINGS)


def test_variants_choose_their_prompts():
  from configs.pretrain import get_config

  paper = get_config("paper").evals.zero_shot
  assert (paper.prompts, paper.class_set, paper.prompt_seed) == ("paper", "pneumonia", 1)
  assert (paper.num_prompts, paper.prompt_pooling) == (0, "max")  # 15 per CheXpert class
  demo = get_config("demo").evals.zero_shot
  assert (demo.prompts, demo.class_set) == ("project", "gloria")  # phantoms: Consolidation
