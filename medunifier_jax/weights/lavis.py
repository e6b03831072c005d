"""BLIP-2's own PyTorch checkpoints (the paper's code base) -> MedUnifier weights.

Two files users of the paper's code have on disk:

- `eva_vit_g.pth`: the EVA ViT-g state dict BLIP-2 starts its vision encoder from (keys
  `patch_embed.proj.*`, `cls_token`, `pos_embed`, `blocks.N.{norm1,attn,norm2,mlp}.*`). EVA's
  attention has one fused `attn.qkv.weight` (3D, D) and separate `attn.q_bias` and `attn.v_bias`
  (D,) (no key bias), exactly the model's layout. BLIP-2 builds 39 blocks and drops the file's
  last one: blocks beyond `vit.depth` are read and left unused (listed in the report). The file
  has no `ln_vision` (BLIP-2 creates it fresh, LayerNorm ones/zeros): it keeps its initial
  values. EVA's final norm and classifier head (`norm.*`, `fc_norm.*`, `head.*`), which BLIP-2's
  ViT does not have, are left unused if a file carries them.
- `blip2_pretrained.pth`: BLIP-2's stage-1 checkpoint, `{"model": state dict}` with
  `visual_encoder.*` (the EVA keys above), `ln_vision.*`, `Qformer.bert.*` (a BERT with
  `crossattention` in every `cross_attention_freq`-th layer and `intermediate_query` /
  `output_query` feed-forward blocks; no token-type embeddings; the vocabulary already holds
  `[DEC]`), `Qformer.cls.predictions.*` (the LM head, its decoder tied to the word embeddings),
  `query_tokens`, `vision_proj.*`, `text_proj.*`, `itm_head.*` and `temp`. A model with a padded
  vocabulary gets the extra rows as from a Hugging Face folder (`hf_import`: mean word
  embedding, zero LM bias); a file with more rows than the model is refused as mis-shaped.

Reading `.pth` files needs torch (the CPU build is enough); it is imported only here and only
when such a file is read, so the rest of the project runs without it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping

import ml_collections
import numpy as np
from flax import nnx

from medunifier_jax.weights import hf_import
from medunifier_jax.weights.hf_import import BUFFERS, _layer_norm, _scalar
from medunifier_jax.weights.mapping import ImportReport, Rule, assign

TORCH_REQUIREMENT = "torch==2.13.0"
# Model weights an EVA ViT file cannot provide (everything but the ViT).
LAVIS_EVA_NOT_IN_CHECKPOINT = (
  "ln_vision/*",
  "qformer/*",
  "query_tokens",
  "vision_proj/*",
  "text_proj/*",
  "itm_head/*",
  "temp",
  "vqvae/*",
)
# Model weights BLIP-2's stage-1 file cannot provide. Its LM head is there in the stage-1 file;
# checkpoints of later stages drop it (`Qformer.cls = None`), so it may be absent.
LAVIS_BLIP2_NOT_IN_CHECKPOINT = ("vqvae/*", "qformer/lm_head/*")
# EVA modules BLIP-2's ViT leaves out (its final norm and classifier), unused when present.
EVA_UNUSED = ("norm.*", "fc_norm.*", "head.*")


# -- reading ----------------------------------------------------------------------------------


def read_pth(path: str) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch `.pth` state dict (or of its `"model"` entry), as float32 NumPy.

  Raises:
    FileNotFoundError: `path` is not a file.
    ImportError: torch is not installed (the message names the pip command).
    ValueError: the file holds something other than a state dict of tensors.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} is not a file; pass the .pth checkpoint itself")
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"{path} is a PyTorch checkpoint; reading it needs torch, which is not installed: "
      f"pip install {TORCH_REQUIREMENT} (the CPU build is enough)"
    ) from e
  try:
    # weights_only: a checkpoint is data; never run code from it.
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(
      f"{path} holds Python objects other than tensors and plain containers, which are not "
      f"read (torch.load weights_only=True): {str(e).splitlines()[0]}"
    ) from e
  if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
    obj = obj["model"]  # the paper's code saves {"model": state_dict, ...}
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  odd = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
  if odd:
    more = " ..." if len(odd) > 10 else ""
    raise ValueError(f"{path} is not a state dict: entries that are not tensors: {odd[:10]}{more}")
  return {
    str(k): np.asarray((v.float() if v.is_floating_point() else v).numpy()) for k, v in obj.items()
  }


def unused_blocks(tensors: Iterable[str], depth: int, prefix: str = "") -> tuple[str, ...]:
  """Glob patterns for the EVA blocks at index >= `depth` present in `tensors` (BLIP-2 uses the
  first `depth` of EVA ViT-g's 40)."""
  pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
  indices = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
  return tuple(f"{prefix}blocks.{i}.*" for i in sorted(indices) if i >= depth)


# -- rules ------------------------------------------------------------------------------------


EVA_VIT_KEYS = hf_import.VitKeys(
  patch="patch_embed.proj",
  cls="cls_token",
  pos="pos_embed",
  block="blocks",
  norm1="norm1",
  norm2="norm2",
  attn="attn",
  proj="proj",
)


def eva_rules(vit: ml_collections.ConfigDict, prefix: str = "") -> list[Rule]:
  """EVA ViT keys (under `prefix`, e.g. `visual_encoder.`) -> `vit/`."""

  def qkv_bias(target: str, attn: str) -> list[Rule]:
    # Separate q and v biases; the key bias is zero by construction and has no parameter.
    return [
      Rule(f"{target}/q_bias", (f"{attn}.q_bias",)),
      Rule(f"{target}/v_bias", (f"{attn}.v_bias",)),
    ]

  return hf_import.vit_layer_rules(vit, prefix, EVA_VIT_KEYS, qkv_bias)


def qformer_rules(model_cfg: ml_collections.ConfigDict, prefix: str = "Qformer.") -> list[Rule]:
  """BLIP-2's Q-Former (`{prefix}bert.*`, LM head `{prefix}cls.*`) -> `qformer/`."""
  qf = model_cfg.qformer
  b = f"{prefix}bert."
  # A padded vocabulary grows the file's rows as `hf_import` grows BERT's (mean row, zero bias).
  rules = hf_import.text_embedding_rules(qf, f"{b}embeddings.", f"{b}embeddings.LayerNorm")
  rules += hf_import.qformer_layer_rules(qf, f"{b}encoder.layer", "self")
  return rules + hf_import.lm_head_rules(qf, f"{prefix}cls.predictions.")


def blip2_rules(model_cfg: ml_collections.ConfigDict) -> list[Rule]:
  """Every MedUnifier weight BLIP-2's own checkpoint provides."""
  rules = eva_rules(model_cfg.vit, prefix="visual_encoder.")
  rules += _layer_norm("ln_vision", "ln_vision")
  rules += [Rule("query_tokens", ("query_tokens",)), Rule("temp", ("temp",), _scalar)]
  rules += qformer_rules(model_cfg)
  return rules + hf_import.head_rules("vision_proj", "text_proj")


# -- import -----------------------------------------------------------------------------------


def read_eva(path: str, model_cfg: ml_collections.ConfigDict):
  """`(tensors, rules, ignore)` for `eva_vit_g.pth`."""
  tensors = read_pth(path)
  ignore = unused_blocks(tensors, model_cfg.vit.depth) + EVA_UNUSED
  return tensors, eva_rules(model_cfg.vit), ignore


def read_blip2(path: str, model_cfg: ml_collections.ConfigDict):
  """`(tensors, rules, ignore)` for `blip2_pretrained.pth`."""
  tensors = read_pth(path)
  hf_import.drop_tied_decoder(tensors, path, head="Qformer.", body="Qformer.bert.")
  prefix = "visual_encoder."
  ignore = (
    BUFFERS
    + unused_blocks(tensors, model_cfg.vit.depth, prefix)
    + tuple(prefix + p for p in EVA_UNUSED)
  )
  return tensors, blip2_rules(model_cfg), ignore


def import_eva(
  model: nnx.Module, model_cfg: ml_collections.ConfigDict, path: str, *, allow: Iterable[str] = ()
) -> ImportReport:
  """Writes the EVA ViT file at `path` into `model`'s ViT.

  Args:
    allow: glob patterns as in `weights.assign`; `LAVIS_EVA_NOT_IN_CHECKPOINT` names everything
      the file never has.
  Raises:
    WeightImportError: listing missing, unexpected and mis-shaped weights.
  """
  tensors, rules, ignore = read_eva(path, model_cfg)
  return assign(model, rules, tensors, allow=allow, ignore=ignore, source=path)


def import_blip2(
  model: nnx.Module, model_cfg: ml_collections.ConfigDict, path: str, *, allow: Iterable[str] = ()
) -> ImportReport:
  """Writes BLIP-2's own checkpoint at `path` into `model` (built from `model_cfg`, whose sizes
  must be the checkpoint's: the `paper` variant's for the released file).

  Args:
    allow: as in `import_eva`; `LAVIS_BLIP2_NOT_IN_CHECKPOINT` names what the file never has.
  Raises:
    WeightImportError: listing missing, unexpected and mis-shaped weights.
  """
  tensors, rules, ignore = read_blip2(path, model_cfg)
  return assign(model, rules, tensors, allow=allow, ignore=ignore, source=path)
