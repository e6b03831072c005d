"""Initial weights from several checkpoints, each for its part of the model (`config.init_from`).

`config.init_from` is either one source for the whole model (`"hf-blip2:DIR"`) or a mapping from
parts to sources, e.g. the paper's initialisation

    {"vision": "lavis-eva:/path/to/eva_vit_g.pth", "qformer": "hf-bert:/path/to/bert"}

(`--config.init_from.vision=...` on the command line). Parts and the model weights they cover:

  vision   `vit/*` and `ln_vision/*`
  qformer  `qformer/*`, `query_tokens`, `vision_proj/*`, `text_proj/*`, `itm_head/*`, `temp`

Everything else (the VQ-VAE) keeps its initial values. Source kinds (`KINDS`):

  hf-blip2:DIR      transformers `Blip2ForImageTextRetrieval` folder      vision, qformer
  hf-bert:DIR       transformers BERT folder (Q-Former text weights)     qformer
  lavis-eva:FILE    the paper's code's `eva_vit_g.pth` (EVA ViT-g)       vision
  lavis-blip2:FILE  the paper's code's `blip2_pretrained.pth`            vision, qformer
  random            keep the part's initial values on purpose (e.g. a frozen random ViT in
                    tests and benchmarks)

A source given for one part writes only that part's weights: the checkpoint's tensors of other
parts are read and reported unused, and the part's weights it lacks keep their initial values.
Every import is checked as in `weights.assign` (missing, unexpected and mis-shaped weights in
one error), and `InitReport` says, weight by weight, which source filled it or that it kept its
initial value.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from medunifier_jax.weights import hf_files, hf_import, lavis
from medunifier_jax.weights.mapping import (
  ImportReport,
  Rule,
  assign,
  matches,
  model_params,
  natural_key,
)

WHOLE = "model"  # the part name of a single source for the whole model (a plain string)
PARTS = ("vision", "qformer")
PART_SCOPES = {
  "vision": ("vit/*", "ln_vision/*"),
  "qformer": ("qformer/*", "query_tokens", "vision_proj/*", "text_proj/*", "itm_head/*", "temp"),
}
RANDOM = "random"
# A path containing this is a placeholder of the paper variant (configs/pretrain.py) that the
# user has not filled in.
PLACEHOLDER = "/path/to/"

# `(tensors, rules, ignore)` from a source path and the model config.
Reader = Callable[
  [str, ml_collections.ConfigDict], tuple[dict[str, np.ndarray], list[Rule], tuple[str, ...]]
]


@dataclasses.dataclass(frozen=True)
class Kind:
  """A kind of weight source.

  Attributes:
    name: the prefix in `KIND:PATH`.
    folder: True for a folder, False for a single file.
    parts: the parts it can initialise.
    key_parts: per part, glob patterns of the checkpoint keys that belong to it (a source used
      for one part leaves the others' tensors unused instead of calling them unexpected).
    allow: model weights the checkpoint never has and tensors the model never uses.
    read: the reader.
    example: what a user would write.
  """

  name: str
  folder: bool
  parts: tuple[str, ...]
  key_parts: Mapping[str, tuple[str, ...]]
  allow: tuple[str, ...]
  read: Reader
  example: str


def _read_hf_blip2(folder, model_cfg):
  return hf_files.read_weights(folder), hf_import.blip2_rules(model_cfg), hf_import.BUFFERS


def _read_hf_bert(folder, model_cfg):
  hf_import.check_bert_fits(folder, model_cfg)
  tensors = hf_import.read_bert_tensors(folder)
  return tensors, hf_import.bert_rules(model_cfg), hf_import.BUFFERS


KINDS = {
  k.name: k
  for k in (
    Kind(
      "hf-blip2",
      True,
      ("vision", "qformer"),
      {
        "vision": ("vision_model.*",),
        "qformer": (
          "qformer.*",
          "embeddings.*",
          "query_tokens",
          "vision_projection.*",
          "text_projection.*",
          "itm_head.*",
          "temp",
        ),
      },
      hf_import.BLIP2_NOT_IN_CHECKPOINT,
      _read_hf_blip2,
      "hf-blip2:/path/to/blip2",
    ),
    Kind(
      "hf-bert",
      True,
      ("qformer",),
      {"qformer": ("*",)},
      hf_import.BERT_NOT_IN_CHECKPOINT,
      _read_hf_bert,
      "hf-bert:/path/to/bert",
    ),
    Kind(
      "lavis-eva",
      False,
      ("vision",),
      {"vision": ("*",)},
      lavis.LAVIS_EVA_NOT_IN_CHECKPOINT,
      lavis.read_eva,
      "lavis-eva:/path/to/eva_vit_g.pth",
    ),
    Kind(
      "lavis-blip2",
      False,
      ("vision", "qformer"),
      {
        "vision": ("visual_encoder.*", "ln_vision.*"),
        "qformer": (
          "Qformer.*",
          "query_tokens",
          "vision_proj.*",
          "text_proj.*",
          "itm_head.*",
          "temp",
        ),
      },
      lavis.LAVIS_BLIP2_NOT_IN_CHECKPOINT,
      lavis.read_blip2,
      "lavis-blip2:/path/to/blip2_pretrained.pth",
    ),
  )
}


class PlaceholderError(ValueError):
  """`config.init_from` still holds a placeholder path of the paper variant."""


# -- parsing and checks -------------------------------------------------------------------------


def where(part: str) -> str:
  """The config field of a part: `config.init_from` or `config.init_from.PART`."""
  return "config.init_from" if part == WHOLE else f"config.init_from.{part}"


def _known() -> str:
  return ", ".join(f"{k.name}:{'DIR' if k.folder else 'FILE'}" for k in KINDS.values())


def parse(value: Any) -> dict[str, str]:
  """`config.init_from` -> `{part: source}`, empty entries dropped.

  A string is one source for the whole model (part `WHOLE`); a mapping (ConfigDict or dict)
  maps parts of `PARTS` to sources. Syntax only: no file is touched.

  Raises:
    ValueError: an unknown part or kind, a missing path, or a kind that cannot fill its part.
  """
  if value is None:
    return {}
  if isinstance(value, str):
    value = value.strip()
    return {WHOLE: _checked(WHOLE, value)} if value else {}
  if not hasattr(value, "items"):
    raise TypeError(
      f"config.init_from must be a string or a mapping of parts to sources, got "
      f"{type(value).__name__}"
    )
  entries = dict(value.items())
  unknown = sorted(set(entries) - set(PARTS))
  if unknown:
    raise ValueError(
      f"config.init_from has unknown parts {unknown}; the parts are {', '.join(PARTS)} "
      f"(or give one string for the whole model)"
    )
  return {
    part: _checked(part, str(entries[part]).strip())
    for part in PARTS
    if entries.get(part) and str(entries[part]).strip()
  }


def _checked(part: str, source: str) -> str:
  if source == RANDOM:
    return source
  name, sep, path = source.partition(":")
  kind = KINDS.get(name)
  if kind is None or not sep or not path:
    raise ValueError(
      f"{where(part)}={source!r}: expected KIND:PATH with KIND one of {_known()}, or "
      f"{RANDOM!r} to keep the initial values"
    )
  if part != WHOLE and part not in kind.parts:
    fits = list(kind.parts)
    raise ValueError(
      f"{where(part)}={source!r}: a {name} checkpoint provides only the "
      f"{' and '.join(fits)} part; give it as init_from.{fits[0]} and take the {part} part "
      f"from another source ({', '.join(k.example for k in KINDS.values() if part in k.parts)})"
    )
  return source


def kind_and_path(source: str) -> tuple[Kind, str]:
  name, _, path = source.partition(":")
  return KINDS[name], path


def fills(sources: Mapping[str, str], part: str) -> bool:
  """Whether a source (not `random`) is given that can initialise `part`."""
  for given, source in sources.items():
    if source == RANDOM or given not in (part, WHOLE):
      continue
    if part in kind_and_path(source)[0].parts:
      return True
  return False


def check_fresh_start(config: ml_collections.ConfigDict, sources: Mapping[str, str]) -> None:
  """The checks of a run that starts without a checkpoint, before anything heavy: placeholder
  and missing paths, a frozen ViT no source loads, a ViT stem no source has, a Q-Former taking
  pretrained word embeddings with a vocabulary trained afresh.

  Raises:
    PlaceholderError, FileNotFoundError, ValueError: each naming the fix.
  """
  for part, source in sources.items():
    if source == RANDOM:
      continue
    kind, path = kind_and_path(source)
    if PLACEHOLDER in path:
      fix = f"--config.init_from.{part}=" if part != WHOLE else "--config.init_from="
      raise PlaceholderError(
        f"{where(part)}={source!r} is a placeholder of the config: download the checkpoint "
        f"and pass its path, {fix}{kind.name}:/real/path, or clear it with {fix} "
        f"(a frozen ViT then needs --config.model.vit.frozen=False)"
      )
    if "://" in path:
      raise ValueError(
        f"{where(part)}={source!r}: weight sources must be local paths; copy "
        "the checkpoint to this machine first"
      )
    ok = os.path.isdir(path) if kind.folder else os.path.isfile(path)
    if not ok:
      what = "a folder written by save_pretrained" if kind.folder else "a .pth file"
      raise FileNotFoundError(f"{where(part)}={source!r}: {path!r} is not {what}")
  vit = config.model.get("vit", None)
  random_on_purpose = RANDOM in (sources.get("vision"), sources.get(WHOLE))
  if vit is not None and vit.frozen and not fills(sources, "vision") and not random_on_purpose:
    given = f" (init_from: {dict(sources)})" if sources else ""
    raise ValueError(
      "config.model.vit.frozen is set but no source in config.init_from loads the ViT"
      f"{given}: it would stay at its random initial values for the whole run, and so would "
      "every image feature. Give the ViT weights, e.g. "
      "--config.init_from.vision=lavis-eva:/path/to/eva_vit_g.pth (or hf-blip2:DIR, "
      "lavis-blip2:FILE), or set --config.model.vit.frozen=False to train it from scratch. "
      "(--config.init_from.vision=random keeps a frozen random ViT on purpose, e.g. for "
      "tests and benchmarks.)"
    )
  if vit is not None and vit.get("stem_channels", 0) and fills(sources, "vision"):
    raise ValueError(
      f"config.model.vit.stem_channels={vit.stem_channels} adds a convolutional stem that "
      "pretrained ViT weights do not have (their patch embedding reads the 3 pixel channels); "
      "set --config.model.vit.stem_channels=0 to load them, or clear "
      "--config.init_from.vision to train the ViT with its stem from scratch"
    )
  data = config.get("data", None)
  text = {
    p: s
    for p, s in sources.items()
    if p in ("qformer", WHOLE) and s != RANDOM and "qformer" in kind_and_path(s)[0].parts
  }
  if text and data is not None and "tokenizer_dir" in data and not data.tokenizer_dir:
    part, source = next(iter(text.items()))
    kind, path = kind_and_path(source)
    hint = (
      f" (for {kind.name}, usually {path} itself)"
      if kind.name.startswith("hf-")
      else (" (bert-base-uncased's, which BLIP-2 extends by [DEC])")
    )
    raise ValueError(
      f"{where(part)}={source!r} gives the Q-Former pretrained word embeddings, but "
      "config.data.tokenizer_dir is empty, so a new vocabulary would be trained on the "
      "reports and its token ids would index unrelated embedding rows. Set "
      f"--config.data.tokenizer_dir to the vocabulary the checkpoint was trained with{hint}."
    )


# -- import and report ---------------------------------------------------------------------------


@dataclasses.dataclass
class PartReport:
  """What one source did for one part (lists sorted; `loaded` and `kept_at_init` are model
  paths, `ignored` checkpoint keys)."""

  part: str
  source: str
  loaded: list[str]
  kept_at_init: list[str]
  ignored: list[str]


@dataclasses.dataclass
class InitReport:
  """Every model weight: which part's source wrote it, or that it kept its initial value."""

  parts: list[PartReport]
  initial_values: list[str]  # written by no source (sorted)
  num_weights: int

  def source_of(self) -> dict[str, str]:
    """`{model path: "PART=SOURCE" or "initial value"}` for every weight."""
    out = {name: "initial value" for name in self.initial_values}
    for p in self.parts:
      out.update({name: f"{p.part}={p.source}" for name in p.loaded})
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))

  def to_dict(self) -> dict[str, Any]:
    return {
      "num_weights": self.num_weights,
      "num_loaded": self.num_weights - len(self.initial_values),
      "parts": [dataclasses.asdict(p) for p in self.parts],
      "initial_values": self.initial_values,
      "weights": self.source_of(),
    }

  def write(self, path: str) -> None:
    from etils import epath

    epath.Path(path).write_text(json.dumps(self.to_dict(), indent=2))

  def summary(self) -> list[str]:
    """A few lines for the log: per source what it filled, then what kept initial values."""
    lines = []
    for p in self.parts:
      if p.source == RANDOM:
        lines.append(
          f"{where(p.part)}=random: {len(p.kept_at_init)} weights keep their "
          "initial values on purpose"
        )
        continue
      line = f"{where(p.part)}={p.source}: {len(p.loaded)} weights loaded"
      if p.kept_at_init:
        line += f"; {len(p.kept_at_init)} kept their initial values ({_groups(p.kept_at_init)})"
      if p.ignored:
        line += f"; {len(p.ignored)} checkpoint tensors unused ({_groups(p.ignored)})"
      lines.append(line)
    lines.append(
      f"{len(self.initial_values)} of {self.num_weights} weights keep their initial values"
      + (f": {_groups(self.initial_values)}" if self.initial_values else "")
    )
    return lines


def _groups(names: Sequence[str], limit: int = 8) -> str:
  """`[vqvae] 150, [ln_vision] 2` for model paths; `blocks.39 16` for checkpoint keys."""
  counts: dict[str, int] = {}
  for name in names:
    parts = name.replace(".", "/").split("/")
    head = "/".join(parts[:2]) if parts[0] in ("blocks", "visual_encoder") else parts[0]
    counts[head] = counts.get(head, 0) + 1
  items = [f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: natural_key(kv[0]))]
  return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def import_sources(
  model: nnx.Module,
  model_cfg: ml_collections.ConfigDict,
  sources: Mapping[str, str],
  *,
  allow: Sequence[str] = (),
) -> InitReport:
  """Writes each source into its part of `model` (concrete or abstract) and reports.

  Args:
    sources: from `parse(config.init_from)`.
    allow: further glob patterns (model paths or checkpoint keys) that may stay at init or go
      unused, on top of what each kind never has.
  Raises:
    WeightImportError: for the first source whose weights do not fit its part (all of its
      problems listed).
  """
  params = model_params(model)
  cache: dict[str, tuple] = {}  # one read per file, even when it serves two parts
  reports = []
  for part, source in sources.items():
    scope = None if part == WHOLE else PART_SCOPES[part]
    if source == RANDOM:
      kept = sorted((k for k in params if scope is None or matches(k, scope)), key=natural_key)
      reports.append(PartReport(part, source, [], kept, []))
      continue
    kind, path = kind_and_path(source)
    if source not in cache:
      cache[source] = kind.read(path, model_cfg)
    tensors, rules, ignore = cache[source]
    if scope is not None:
      rules = [r for r in rules if matches(r.target, scope)]
      ignore = ignore + tuple(
        p for other, patterns in kind.key_parts.items() if other != part for p in patterns
      )
    report: ImportReport = assign(
      model,
      rules,
      tensors,
      allow=kind.allow + tuple(allow),
      ignore=ignore,
      source=f"{where(part)}={source}",
      scope=scope,
    )
    reports.append(PartReport(part, source, report.loaded, report.kept_at_init, report.ignored))
  loaded = {name for r in reports for name in r.loaded}
  return InitReport(
    parts=reports,
    initial_values=sorted((k for k in params if k not in loaded), key=natural_key),
    num_weights=len(params),
  )


def check_frozen_loaded(
  report: InitReport, frozen: Sequence[str], sources: Mapping[str, str]
) -> None:
  """Refuses frozen weights (`frozen`: model paths) that no source wrote, unless the part they
  belong to was declared `random`."""
  if sources.get("vision") == RANDOM or sources.get(WHOLE) == RANDOM:
    return
  initial = set(report.initial_values)
  left = [name for name in frozen if name in initial]
  if left:
    raise ValueError(
      f"{len(left)} frozen weights kept their random initial values "
      f"({_groups(left)}; e.g. {left[0]}): a frozen part must come from a checkpoint. Give "
      "it in config.init_from (e.g. --config.init_from.vision=lavis-eva:FILE) or unfreeze "
      "it (--config.model.vit.frozen=False)."
    )
