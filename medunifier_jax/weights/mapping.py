"""Checked assignment of checkpoint tensors to a Flax NNX model.

A weight mapping is a list of `Rule`s, one per model weight: which checkpoint tensors it reads
and how they become the model's array (transposes, reshapes, concatenations). `assign` checks
the whole mapping before it writes anything:

- missing: a model weight (`nnx.Param`) with no rule, or whose rule reads a tensor the
  checkpoint lacks;
- unexpected: a checkpoint tensor that no rule reads;
- shape: a converted tensor whose shape differs from the model weight's.

All problems are reported together in one `WeightImportError`, sorted and grouped by top-level
module. An explicit allow-list (glob patterns over model paths such as `vqvae/*` or checkpoint
keys such as `pooler.*`) names the weights a caller means to leave at their initial values or
to drop; nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def identity(x: np.ndarray) -> np.ndarray:
  return x


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one model weight is made from checkpoint tensors.

  Attributes:
    target: the weight's path in the model, '/'-joined (`qformer/layers/0/query/kernel`).
    sources: checkpoint keys read, in the order `convert` takes them.
    convert: maps the source arrays to the model's array (default: the one source unchanged).
  """

  target: str
  sources: tuple[str, ...]
  convert: Callable[..., np.ndarray] = identity


@dataclasses.dataclass
class ImportReport:
  """What `assign` did: weights written, weights left at init, tensors dropped (all sorted)."""

  loaded: list[str]
  kept_at_init: list[str]
  ignored: list[str]


class WeightImportError(ValueError):
  """A checkpoint does not fit the model; the message lists every problem.

  Attributes hold the same lists for programs: `missing` (model paths), `unexpected` (checkpoint
  keys) and `mismatched` (model path, checkpoint keys, expected shape, found shape, shapes
  of the checkpoint tensors).
  """

  def __init__(self, source, missing, unexpected, mismatched, lacking=None):
    self.missing = missing
    self.unexpected = unexpected
    self.mismatched = mismatched
    super().__init__(_format_error(source, missing, unexpected, mismatched, lacking or {}))


def path_str(path: Sequence) -> str:
  return "/".join(str(p) for p in path)


def model_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  """The model's `nnx.Param` variables by '/'-joined path."""
  return {path_str(path): var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}


def natural_key(name: str) -> tuple:
  """Sort key that puts `layers/10` after `layers/9`."""
  parts = name.replace(".", "/").split("/")
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def matches(name: str, patterns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def assign(
  model: nnx.Module,
  rules: Sequence[Rule],
  tensors: Mapping[str, np.ndarray],
  *,
  allow: Iterable[str] = (),
  ignore: Iterable[str] = (),
  source: str = "checkpoint",
  scope: Iterable[str] | None = None,
) -> ImportReport:
  """Checks `rules` against the model and the tensors, then writes the weights in place.

  Args:
    model: the model to fill, concrete or abstract (from `nnx.eval_shape`); weights not
      written keep their current values (initial ones, or abstract placeholders).
    rules: one rule per model weight to import.
    tensors: checkpoint tensors by key.
    allow: glob patterns (model paths or checkpoint keys) the caller leaves out on purpose:
      matching model weights may stay at init, matching tensors may go unused.
    ignore: patterns for tensors that are never weights (e.g. saved index buffers).
    source: what to call the checkpoint in error messages (usually its folder).
    scope: glob patterns of the model paths this import is about (e.g. `("vit/*",
      "ln_vision/*")` when a checkpoint initialises only the vision part); weights outside it
      are neither written nor reported, and every rule must target a weight inside it.
      None: the whole model.

  Returns:
    an `ImportReport`.

  Raises:
    WeightImportError: listing every missing, unexpected and mis-shaped weight not allowed.
  """
  allow, ignore = tuple(allow), tuple(ignore)
  params = model_params(model)
  if scope is not None:
    scope = tuple(scope)
    params = {k: v for k, v in params.items() if matches(k, scope)}
  by_target: dict[str, Rule] = {}
  for rule in rules:
    if rule.target not in params:
      # The mapping and the model disagree: a bug in the mapping, never a user error.
      where = "the model" if scope is None else f"the model's part {scope}"
      raise KeyError(f"weight mapping names {rule.target!r}, which {where} does not have")
    if rule.target in by_target:
      raise KeyError(f"weight mapping writes {rule.target!r} twice")
    by_target[rule.target] = rule

  missing, kept, mismatched, ready = [], [], [], {}
  lacking: dict[str, tuple[str, ...]] = {}  # missing weight -> checkpoint keys it needed
  for target, var in params.items():
    rule = by_target.get(target)
    absent = () if rule is None else tuple(k for k in rule.sources if k not in tensors)
    if rule is None or absent:
      if matches(target, allow) or (absent and all(matches(k, allow) for k in absent)):
        kept.append(target)
      else:
        missing.append(target)
        if absent:
          lacking[target] = absent
      continue
    raw = [tensors[k] for k in rule.sources]
    value = np.asarray(rule.convert(*raw))
    if tuple(value.shape) != tuple(var.shape):
      mismatched.append(
        (target, rule.sources, tuple(var.shape), tuple(value.shape), [tuple(r.shape) for r in raw])
      )
      continue
    ready[target] = value

  used = {k for rule in by_target.values() for k in rule.sources}
  ignored, unexpected = [], []
  for key in tensors:
    if key in used:
      continue
    if matches(key, ignore) or matches(key, allow):
      ignored.append(key)
    else:
      unexpected.append(key)

  if missing or unexpected or mismatched:
    raise WeightImportError(
      source,
      sorted(missing, key=natural_key),
      sorted(unexpected, key=natural_key),
      sorted(mismatched, key=lambda m: natural_key(m[0])),
      lacking,
    )
  for target, value in ready.items():
    # The model may be abstract (`nnx.eval_shape`): its values are then ShapeDtypeStructs.
    var = params[target]
    current = var.get_value()
    array = jnp.asarray(value, dtype=current.dtype)
    sharding = getattr(current, "sharding", None)
    var.set_value(jax.device_put(array, sharding) if sharding is not None else array)
  return ImportReport(
    loaded=sorted(ready, key=natural_key),
    kept_at_init=sorted(kept, key=natural_key),
    ignored=sorted(ignored, key=natural_key),
  )


def _grouped(names: Sequence[str], indent: str, notes: Mapping[str, str]) -> list[str]:
  groups: dict[str, list[str]] = {}
  for name in names:
    head = name.replace(".", "/").split("/")[0]
    groups.setdefault(head, []).append(name)
  lines = []
  for head in sorted(groups):
    lines.append(f"{indent}[{head}] {len(groups[head])}:")
    lines.extend(f"{indent}  {n}{notes.get(n, '')}" for n in groups[head])
  return lines


def _format_error(source, missing, unexpected, mismatched, lacking) -> str:
  lines = [f"weights from {source} do not fit the model:"]
  if missing:
    lines.append(f"  missing: {len(missing)} model weights have no value in the checkpoint")
    notes = {k: f" (checkpoint lacks {', '.join(v)})" for k, v in lacking.items()}
    lines += _grouped(missing, "    ", notes)
  if unexpected:
    lines.append(f"  unexpected: {len(unexpected)} checkpoint tensors that no model weight uses")
    lines += _grouped(unexpected, "    ", {})
  if mismatched:
    lines.append(f"  shape mismatch: {len(mismatched)} weights")
    for target, sources, expected, found, raw in mismatched:
      raw_s = ", ".join(f"{k} {s}" for k, s in zip(sources, raw))
      lines.append(
        f"    {target}: model expects {expected}, checkpoint gives {found} (from {raw_s})"
      )
  if missing or unexpected:
    lines.append(
      "Check that the folder and the model configuration belong together; to leave weights "
      "out on purpose, pass them in allow=[...] (glob patterns over the model paths or "
      "checkpoint keys listed above)."
    )
  else:
    lines.append("The model configuration's sizes differ from the checkpoint's.")
  return "\n".join(lines)
