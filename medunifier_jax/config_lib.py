"""Configuration mechanics in one place: loading config files, variant tables, derived fields and
the model's geometry rules.

- `load(spec)` returns a full configuration from "configs/pretrain.py:demo", a bare variant of
  configs/pretrain.py ("demo"), or a ConfigDict (e.g. one read back from a workdir's JSON).
- `override(config, table)` sets dotted keys ("model.vit.image_size": 48); config files build
  each variant from one such table (`VARIANTS` in configs/pretrain.py and configs/prior.py).
- `derive(config)` makes the fields that restate another one (`DERIVED`) follow it, so a
  command-line override of the source (`--config.model.vit.image_size=96`) moves them too.
- `check_geometry(model_cfg)` states every rule by which the ViT, Q-Former and VQ-VAE must fit
  together; the model, the VQ-VAE and the weight import all call it.

This module imports nothing heavy: config files and the models both import it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_FILE = "pretrain.py"

# Integer fields that restate another (target -> source, dotted paths from the config's root). They
# hold one-way references, so setting the source moves the target, while setting the target alone
# (e.g. `--config.data.image_size=64`) leaves the source as it is.
DERIVED = {
  "data.image_size": "model.vit.image_size",
  "data.max_text_len": "model.max_text_len",
  # [DEC] takes the id right after the tokenizer's vocabulary.
  "data.tokenizer_vocab_size": "model.qformer.dec_token_id",
}
# Report generation decodes at most the paper's 95 tokens, and never past the model's text length;
# applies to every `evals` entry whose task is report generation.
REPORT_MAX_LENGTH = 95


# -- loading ---------------------------------------------------------------------------------


def load_module(path: str | Path) -> ModuleType:
  """Executes a config file by path (configs/ is not a package, so they load from any directory)."""
  path = Path(path)
  spec = importlib.util.spec_from_file_location(f"medunifier_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(
  spec: str | ml_collections.ConfigDict | None = None, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """A full configuration with its derived fields linked (`derive`).

  Args:
    spec: "PATH.py[:VARIANT]" (a relative PATH is tried from the working directory, then from
      the repository root), a bare variant of configs/pretrain.py ("demo"), a ConfigDict (linked
      in place and returned), or None (configs/pretrain.py's default variant).
    overrides: dotted keys and values applied after linking, as command-line overrides are
      (`{"model.vit.image_size": 96}` moves `data.image_size` too).
  """
  if isinstance(spec, ml_collections.ConfigDict):
    if "model" not in spec:
      raise ValueError("pass the full configuration (with .model), not config.model")
    config = spec
  else:
    path, variant = _split_spec(spec)
    config = load_module(_find_file(path)).get_config(variant)
  derive(config)
  return override(config, overrides or {})


def _split_spec(spec: str | None) -> tuple[str, str | None]:
  """ "configs/prior.py:tiny" -> (path, "tiny"); "tiny" -> (configs/pretrain.py, "tiny")."""
  if not spec:
    return str(CONFIG_DIR / DEFAULT_FILE), None
  path, _, variant = spec.partition(":")
  if not path.endswith(".py"):
    return str(CONFIG_DIR / DEFAULT_FILE), spec
  return path, variant or None


def _find_file(path: str) -> Path:
  candidates = [Path(path)]
  if not Path(path).is_absolute():
    candidates.append(REPO_ROOT / path)
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
    f"configuration file {path!r} does not exist (looked at {', '.join(map(str, candidates))})"
  )


# -- variant tables --------------------------------------------------------------------------


def select_variant(arg: str | None, variants: Mapping[str, Any] | tuple, default: str) -> str:
  """The variant `arg` names (`default` when empty); a clear error for an unknown one."""
  variant = arg or default
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r}; choose one of {tuple(variants)}")
  return variant


def override(config: ml_collections.ConfigDict, table: Mapping[str, Any]):
  """Sets each dotted key of `table` in `config`, in place; returns `config`.

  Only existing fields can be set (a misspelt key is an error, not a new field), with the
  ConfigDict's type checks, as `--config.KEY=VALUE` does.
  """
  for dotted, value in table.items():
    node, name = _parent(config, dotted)
    if node is None or name not in node:
      raise KeyError(f"{dotted!r} is not a field of this configuration")
    node[name] = value
  return config


def fill_absent(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> list[str]:
  """Sets, in place, each dotted field of `values` that `config` lacks under a node it has;
  returns their names (fields `config` has are kept)."""
  filled = []
  for dotted, value in values.items():
    node, name = _parent(config, dotted)
    if node is not None and name not in node:
      node[name] = value
      filled.append(dotted)
  return filled


def _parent(config: ml_collections.ConfigDict, dotted: str):
  """(the ConfigDict holding `dotted`'s last part, that part), or (None, part) when absent."""
  *parents, name = dotted.split(".")
  node = config
  for parent in parents:
    node = node.get(parent) if isinstance(node, ml_collections.ConfigDict) else None
  return (node if isinstance(node, ml_collections.ConfigDict) else None), name


# -- derived fields --------------------------------------------------------------------------


def derive(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Links every derived field the config has to its source, in place; returns `config`.

  Config files call it before returning, so command-line overrides of a source propagate;
  `load` calls it again for configs from elsewhere (a workdir's JSON holds plain copies). A
  derived field takes its source's current value, so call it after editing a copy-only config.
  """
  for target, source in DERIVED.items():
    _link(config, target, _source_ref(config, source))
  max_text_len = _source_ref(config, "model.max_text_len")
  for name, entry in (config.get("evals") or {}).items():
    if isinstance(entry, ml_collections.ConfigDict) and entry.get("task", name) == "report_gen":
      _link(config, f"evals.{name}.max_length", _at_most(max_text_len, REPORT_MAX_LENGTH))
  return config


def tuples_from_json(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config read back from JSON with its lists made tuples again (nested ones too), as the
  config files hold them, so that command-line overrides, which take tuples, work on it. Call
  it before `derive`: it builds new dicts, which carry no links."""

  def fix(value):
    if isinstance(value, ml_collections.ConfigDict):
      return tuples_from_json(value)
    if isinstance(value, list):
      return tuple(fix(v) for v in value)
    return value

  return ml_collections.ConfigDict({k: fix(v) for k, v in config.items()})


def fill_missing(
  config: ml_collections.ConfigDict,
  reference: ml_collections.ConfigDict,
  *,
  closed: tuple[str, ...] = ("evals",),
  prefix: str = "",
) -> list[str]:
  """Adds to `config`, in place, every field of `reference` it lacks; returns their dotted names.

  For a config saved by an earlier version of the project (`WORKDIR/config.json`), which lacks
  the fields added since: they take `reference`'s values. Fields `config` has are kept, and
  nodes it holds as another type are not entered. Under the `closed` nodes (dotted paths) only
  existing entries are completed: an evaluation set the run did not have is not added to it.
  """
  added = []
  for name in reference.keys():
    dotted = f"{prefix}{name}"
    if name not in config:
      if prefix.rstrip(".") in closed:
        continue
      value = reference[name]
      config[name] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
      added.append(dotted)
    elif isinstance(config[name], ml_collections.ConfigDict) and isinstance(
      reference[name], ml_collections.ConfigDict
    ):
      added += fill_missing(config[name], reference[name], closed=closed, prefix=dotted + ".")
  return added


def _source_ref(config: ml_collections.ConfigDict, dotted: str):
  """A one-way reference to the integer field `dotted`, or None when the config has none.

  Built as `ref + 0` rather than `get_oneway_ref`: any operation makes the reference one-way,
  and an arithmetic one pickles (configs travel to data-loading processes) where the library's
  identity lambda does not.
  """
  node, name = _parent(config, dotted)
  if node is None or name not in node:
    return None
  if not isinstance(node[name], int):
    raise TypeError(f"derived fields follow integer fields; {dotted} is {node[name]!r}")
  return node.get_ref(name) + 0


def _link(config: ml_collections.ConfigDict, dotted: str, ref) -> None:
  node, name = _parent(config, dotted)
  if ref is not None and node is not None and name in node:
    node[name] = ref


def _at_most(ref, cap: int):
  """min(ref, cap) that follows `ref`; references support arithmetic only, hence via abs."""
  if ref is None:
    return None
  return (ref + cap - abs(ref - cap)) // 2


# -- geometry --------------------------------------------------------------------------------


def check_geometry(model_cfg: ml_collections.ConfigDict) -> int:
  """Checks that the parts of `config.model` fit together; returns k, the decoder's x2 steps.

  The rules (S = vit.image_size, P = vit.patch_size, g = vqvae.grid):
    S % P == 0 and S / P == g           the VQ-VAE reads the ViT's patch tokens as its grid
    g even, g >= 4                      the top grid is g/2; the decoder's 3x3 valid conv -> g-2
    S == (g - 2) * 2**k, k >= 1         that conv, then k x2 transposed convolutions
    len(vqvae.decoder_channels) == k-1  the widths after each upsampling but the last (-> 3)
    query_grid rows * cols == qformer.num_queries   the query outputs are read as that grid
    vqvae.latent_dim % 4 == 0           2D sine/cosine position encoding, d/2 bottlenecks
    max_text_len <= qformer.max_position_embeddings

  Raises:
    ValueError: one message listing every broken rule with its fix.
  """
  vit, qf, vq = model_cfg.vit, model_cfg.qformer, model_cfg.vqvae
  problems = _patch_grid_problems(vit.image_size, vit.patch_size, vq.grid)
  vq_problems, k = _vqvae_problems(vq, vit.image_size)
  problems += vq_problems
  problems += _query_problems(vq.query_grid, qf.num_queries)
  if model_cfg.max_text_len > qf.max_position_embeddings:
    problems.append(
      f"model.max_text_len={model_cfg.max_text_len} exceeds "
      f"model.qformer.max_position_embeddings={qf.max_position_embeddings}: lower the first "
      "or raise the second"
    )
  _raise_if(problems)
  return k


def bottom_depth(cfg: ml_collections.ConfigDict) -> int:
  """Codes per bottom cell of a `model.vqvae` (or a prior's `model`) config: its `bottom_depth`,
  1 for configs saved before the field existed."""
  return int(cfg.get("bottom_depth", 1))


def bottom_codes_shape(grid: int, depth: int) -> tuple[int, ...]:
  """One image's bottom codes: (g, g), or (g, g, R) with R > 1 codes per cell."""
  return (grid, grid) if depth == 1 else (grid, grid, depth)


def check_vqvae_geometry(vqvae_cfg: ml_collections.ConfigDict, image_size: int) -> int:
  """The rules of `check_geometry` that the VQ-VAE alone can check (it sees neither the ViT's
  patch size nor the query count); returns k. Same messages, same ValueError."""
  problems, k = _vqvae_problems(vqvae_cfg, image_size)
  _raise_if(problems)
  return k


def _raise_if(problems: list[str]) -> None:
  if problems:
    raise ValueError(
      f"the model's geometry does not fit together ({len(problems)} "
      f"problem{'s' if len(problems) > 1 else ''}; rules: "
      "medunifier_jax/config_lib.py check_geometry):\n" + "\n".join(f"  - {p}" for p in problems)
    )


def _patch_grid_problems(image_size: int, patch_size: int, grid: int) -> list[str]:
  s, p = int(image_size), int(patch_size)
  if s % p:
    return [
      f"model.vit.image_size={s} is not a multiple of model.vit.patch_size={p} (the ViT "
      f"cuts the image into {p}x{p} patches): change one of them"
    ]
  if s // p != grid:
    return [
      f"the ViT's patch grid is {s}/{p}={s // p} but model.vqvae.grid={grid} (the VQ-VAE "
      f"reads the patch tokens as its grid): set model.vqvae.grid={s // p} or change "
      "model.vit.image_size / model.vit.patch_size"
    ]
  return []


def _query_problems(query_grid, num_queries: int) -> list[str]:
  if len(query_grid) != 2 or min(query_grid) < 1:
    return []  # reported by _vqvae_problems
  rows, cols = query_grid
  if rows * cols == num_queries:
    return []
  n = int(num_queries)
  a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0) if n > 0 else 1
  return [
    f"model.vqvae.query_grid={tuple(query_grid)} holds {rows * cols} cells but "
    f"model.qformer.num_queries={n} (the query outputs are read as that grid): set "
    f"model.vqvae.query_grid=({a}, {max(n, 1) // a}) or change model.qformer.num_queries"
  ]


def _vqvae_problems(vq: ml_collections.ConfigDict, image_size: int) -> tuple[list[str], int]:
  """(the broken VQ-VAE rules, k); k is 0 when the image size admits none."""
  grid, s = int(vq.grid), int(image_size)
  problems = []
  if grid < 4 or grid % 2:
    problems.append(
      f"model.vqvae.grid must be even and >= 4 (the top grid is grid/2 and the decoder's 3x3 "
      f"valid convolution needs grid - 2 >= 2), got {grid}"
    )
  if len(vq.query_grid) != 2 or min(vq.query_grid) < 1:
    problems.append(
      f"model.vqvae.query_grid must be two positive sizes (rows, cols), got {tuple(vq.query_grid)}"
    )
  if vq.latent_dim < 4 or vq.latent_dim % 4:
    problems.append(
      f"model.vqvae.latent_dim must be a positive multiple of 4 (2D sine/cosine position "
      f"encoding and d/2 residual bottlenecks), got {vq.latent_dim}"
    )
  if bottom_depth(vq) < 1:
    problems.append(
      f"model.vqvae.bottom_depth is the number of codes per bottom cell (1: the paper's one "
      f"code); it must be at least 1, got {vq.bottom_depth}"
    )
  k, decode_problem = _decoder_steps(grid, s, tuple(vq.decoder_channels))
  if decode_problem:
    problems.append(decode_problem)
  return problems, k


def _decoder_steps(grid: int, image_size: int, channels: tuple) -> tuple[int, str]:
  """(k, "") when (grid - 2) * 2**k == image_size and channels has k - 1 entries, else
  (k or 0, what to change)."""
  base = grid - 2
  if base < 1:
    return 0, ""  # the grid rule already says so
  ratio, rest = divmod(image_size, base)
  if rest or ratio < 2 or ratio & (ratio - 1):
    sizes = ", ".join(str(base * 2**k) for k in range(1, 6))
    return 0, (
      f"image size {image_size} (model.vit.image_size) cannot be decoded from a {grid}x{grid} "
      f"grid: the decoder maps {grid} -> {base} (3x3 valid convolution) and then doubles "
      f"k >= 1 times, so the image size must be {base} * 2^k; valid sizes for grid {grid}: "
      f"{sizes}, ... (or change model.vqvae.grid together with model.vit.image_size / "
      "model.vit.patch_size)"
    )
  k = ratio.bit_length() - 1
  if len(channels) != k - 1:
    return k, (
      f"image size {image_size} from grid {grid} takes k={k} x2 upsamplings, so "
      f"model.vqvae.decoder_channels needs k-1={k - 1} entries (the channels after each "
      f"upsampling but the last, which outputs 3); got {len(channels)}: {channels}"
    )
  return k, ""
