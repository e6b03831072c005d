"""Hugging Face BLIP-2 and BERT folders -> MedUnifier weights (checked, with listed errors).

Two sources:

- BLIP-2 (`Blip2ForImageTextRetrieval` saved by transformers with `use_qformer_text_input=True`):
  the ViT and `ln_vision` (`vision_model.post_layernorm`), the Q-Former (text embeddings, both
  feed-forward blocks, cross-attention), the query tokens, `vision_projection`,
  `text_projection`, `itm_head`, and the temperature when the file has one. The model's sizes
  come from the folder's config.json (`blip2_config`). BLIP-2 has no VQ-VAE, no LM head in this
  class and no temperature: those keep their initial values, which the caller states with
  `BLIP2_NOT_IN_CHECKPOINT` in the allow-list.
- BERT (`BertModel` or `BertForMaskedLM`): the Q-Former's text weights. The query feed-forward
  weights are copies of the text ones (the BLIP-2 initialisation), cross-attention stays at its
  initial values, and `[DEC]` is appended to the vocabulary: one word-embedding row (the
  mean of BERT's rows) and, with an LM head, one zero bias. BERT's token-type embedding for
  type 0 is folded into the position table: every text token gets both, so the sum is exact and
  the Q-Former reproduces `BertModel` numerically. `BertModel` files have no LM head, so the head
  keeps its init (`qformer/lm_head/*` must be allowed); the pooler is never used.

A model whose vocabulary is padded (`qformer.vocab_size` > the checkpoint's rows; ids above
`dec_token_id` are never fed and their logits are masked) gets the extra rows the way `[DEC]`
gets its row from BERT: the mean word embedding and a zero LM bias (the LM head's decoder is
tied to the word embeddings, so it has no rows of its own). A checkpoint with more rows than the
model is refused as mis-shaped.

PyTorch layouts become Flax ones: Linear (out, in) -> kernel (in, out); Conv2d (O, I, kh, kw)
-> (kh, kw, I, O). BLIP-2's fused qkv bias is split into the query and value biases; its key
third is dropped, which is exact: a key bias adds q.b_k to every logit of a query, and softmax
ignores a constant shift.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterable

import ml_collections
import numpy as np
from flax import nnx

from medunifier_jax import config_lib
from medunifier_jax.weights import hf_files
from medunifier_jax.weights.mapping import ImportReport, Rule, assign

# Model weights a BLIP-2 retrieval checkpoint cannot provide (pass them in `allow`).
BLIP2_NOT_IN_CHECKPOINT = ("vqvae/*", "temp", "qformer/lm_head/*")
# Model weights a BERT checkpoint cannot provide, and BERT tensors the model has no use for.
BERT_NOT_IN_CHECKPOINT = (
  "vit/*",
  "ln_vision/*",
  "query_tokens",
  "qformer/layers/*/crossattention/*",
  "qformer/lm_head/*",
  "vision_proj/*",
  "text_proj/*",
  "itm_head/*",
  "temp",
  "vqvae/*",
  "pooler.*",
)
# Saved index buffers, never weights.
BUFFERS = ("*position_ids", "*token_type_ids")
# A Q-Former vocabulary may exceed BERT's + [DEC] by fewer rows than this (the configs pad it to
# a multiple of 128); a larger excess means a config made for another vocabulary.
VOCAB_PADDING = 128


# -- layout conversions --------------------------------------------------------------------------


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> Flax kernel (in, out)."""
  return w.T


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (O, I, kh, kw) -> Flax kernel (kh, kw, I, O)."""
  return w.transpose(2, 3, 1, 0)


def _scalar(x: np.ndarray) -> np.ndarray:
  return x.reshape(()) if x.size == 1 else x


def _linear(target: str, source: str) -> list[Rule]:
  return [
    Rule(f"{target}/kernel", (f"{source}.weight",), linear_kernel),
    Rule(f"{target}/bias", (f"{source}.bias",)),
  ]


def _layer_norm(target: str, source: str) -> list[Rule]:
  return [
    Rule(f"{target}/scale", (f"{source}.weight",)),
    Rule(f"{target}/bias", (f"{source}.bias",)),
  ]


# -- rules -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VitKeys:
  """Where a checkpoint keeps the ViT's tensors (names relative to its prefix); `block` is the
  layer list ("encoder.layers" -> "encoder.layers.{i}."), the rest are names inside a block."""

  patch: str
  cls: str
  pos: str
  block: str
  norm1: str
  norm2: str
  attn: str
  proj: str  # the attention output projection, inside `attn`


BLIP2_VIT_KEYS = VitKeys(
  patch="embeddings.patch_embedding",
  cls="embeddings.class_embedding",
  pos="embeddings.position_embedding",
  block="encoder.layers",
  norm1="layer_norm1",
  norm2="layer_norm2",
  attn="self_attn",
  proj="projection",
)


def vit_layer_rules(
  vit: ml_collections.ConfigDict,
  prefix: str,
  keys: VitKeys,
  qkv_bias: Callable[[str, str], list[Rule]],
) -> list[Rule]:
  """`vit/` from a checkpoint laid out as `keys` (BLIP-2's vision model, EVA ViT-g): the patch,
  class and position embeddings and every block. `qkv_bias(target, source_attn)` gives the
  q/v bias rules of one block (BLIP-2 stores one qkv bias, EVA separate q and v biases)."""
  rules = [
    Rule("vit/embeddings/patch_embedding/kernel", (f"{prefix}{keys.patch}.weight",), conv_kernel),
    Rule("vit/embeddings/patch_embedding/bias", (f"{prefix}{keys.patch}.bias",)),
    Rule("vit/embeddings/class_embedding", (f"{prefix}{keys.cls}",)),
    Rule("vit/embeddings/position_embedding", (f"{prefix}{keys.pos}",)),
  ]
  for i in range(vit.depth):
    t, s = f"vit/layers/{i}", f"{prefix}{keys.block}.{i}"
    attn = f"{s}.{keys.attn}"
    rules += _layer_norm(f"{t}/layer_norm1", f"{s}.{keys.norm1}")
    rules += _layer_norm(f"{t}/layer_norm2", f"{s}.{keys.norm2}")
    rules.append(Rule(f"{t}/self_attn/qkv/kernel", (f"{attn}.qkv.weight",), linear_kernel))
    if vit.qkv_bias:
      rules += qkv_bias(f"{t}/self_attn", attn)
    rules += _linear(f"{t}/self_attn/projection", f"{attn}.{keys.proj}")
    rules += _linear(f"{t}/mlp/fc1", f"{s}.mlp.fc1")
    rules += _linear(f"{t}/mlp/fc2", f"{s}.mlp.fc2")
  return rules


def vit_rules(vit: ml_collections.ConfigDict, prefix: str = "vision_model.") -> list[Rule]:
  """`Blip2VisionModel` -> `vit/` (the ViT) and `ln_vision/` (its `post_layernorm`)."""
  d = vit.width

  def qkv_bias(target: str, attn: str) -> list[Rule]:
    # One stored qkv bias; the key bias is zero by construction and has no parameter.
    both = (f"{attn}.qkv.bias",)
    return [
      Rule(f"{target}/q_bias", both, lambda b: b[:d]),
      Rule(f"{target}/v_bias", both, lambda b: b[2 * d :]),
    ]

  rules = vit_layer_rules(vit, prefix, BLIP2_VIT_KEYS, qkv_bias)
  rules += _layer_norm("ln_vision", f"{prefix}post_layernorm")
  return rules


def qformer_layer_rules(
  qf: ml_collections.ConfigDict, block: str, self_attention: str
) -> list[Rule]:
  """Every Q-Former layer from `{block}.{i}.*` (a BERT layout): self-attention, the
  cross-attention of every `cross_attention_freq`-th layer and both feed-forward branches
  (text and `_query`). `self_attention` names the attention module inside `attention.`."""
  rules = []
  for i in range(qf.num_layers):
    t, s = f"qformer/layers/{i}", f"{block}.{i}"
    rules += _attention_rules(f"{t}/attention", f"{s}.attention", self_attention)
    if i % qf.cross_attention_freq == 0:
      rules += _attention_rules(f"{t}/crossattention", f"{s}.crossattention", self_attention)
    rules += _ffn_rules(t, s, query_suffix="_query")
  return rules


def _attention_rules(target: str, source: str, self_attention: str) -> list[Rule]:
  """BERT attention block: `{source}.{self_attention}.query/key/value`, `{source}.output.*`."""
  rules = []
  for name in ("query", "key", "value"):
    rules += _linear(f"{target}/{name}", f"{source}.{self_attention}.{name}")
  rules += _linear(f"{target}/output_dense", f"{source}.output.dense")
  rules += _layer_norm(f"{target}/output_layernorm", f"{source}.output.LayerNorm")
  return rules


def _ffn_rules(target: str, source: str, *, query_suffix: str) -> list[Rule]:
  """Text and query feed-forward blocks; the query one is read from `intermediate{suffix}`.

  BLIP-2 stores it as `intermediate_query`/`output_query` (suffix `_query`); from BERT the
  suffix is empty, so the query block starts as a copy of the text one.
  """
  rules = _linear(f"{target}/intermediate/dense", f"{source}.intermediate.dense")
  rules += _linear(f"{target}/output/dense", f"{source}.output.dense")
  rules += _layer_norm(f"{target}/output/layernorm", f"{source}.output.LayerNorm")
  q = query_suffix
  rules += _linear(f"{target}/intermediate_query/dense", f"{source}.intermediate{q}.dense")
  rules += _linear(f"{target}/output_query/dense", f"{source}.output{q}.dense")
  rules += _layer_norm(f"{target}/output_query/layernorm", f"{source}.output{q}.LayerNorm")
  return rules


def blip2_rules(model_cfg: ml_collections.ConfigDict) -> list[Rule]:
  """Every MedUnifier weight a `Blip2ForImageTextRetrieval` checkpoint provides."""
  qf = model_cfg.qformer
  rules = vit_rules(model_cfg.vit)
  rules += [
    Rule("query_tokens", ("query_tokens",)),
    Rule("temp", ("temp",), _scalar),  # LAVIS-converted files only; transformers has none
  ]
  rules += text_embedding_rules(qf, "embeddings.", "qformer.layernorm")
  rules += qformer_layer_rules(qf, "qformer.encoder.layer", "attention")
  rules += head_rules("vision_projection", "text_projection")
  return rules


def text_embedding_rules(
  qf: ml_collections.ConfigDict, embeddings: str, layernorm: str, position: Rule | None = None
) -> list[Rule]:
  """`qformer/embeddings/`: the word embeddings `{embeddings}word_embeddings.weight` (grown to
  `qf.vocab_size` rows), the positions `{embeddings}position_embeddings.weight` (or the rule
  `position`) and the LayerNorm `layernorm`."""
  rules = [
    Rule(
      "qformer/embeddings/word_embeddings/embedding",
      (f"{embeddings}word_embeddings.weight",),
      grow_embedding(qf.vocab_size),
    ),
    position
    or Rule(
      "qformer/embeddings/position_embeddings/embedding",
      (f"{embeddings}position_embeddings.weight",),
    ),
  ]
  return rules + _layer_norm("qformer/embeddings/layernorm", layernorm)


def lm_head_rules(qf: ml_collections.ConfigDict, head: str) -> list[Rule]:
  """BERT's LM head `{head}transform.*` and `{head}bias` (grown to `qf.vocab_size` entries) ->
  `qformer/lm_head/` (its decoder is tied to the word embeddings)."""
  rules = _linear("qformer/lm_head/dense", f"{head}transform.dense")
  rules += _layer_norm("qformer/lm_head/layernorm", f"{head}transform.LayerNorm")
  rules.append(Rule("qformer/lm_head/bias", (f"{head}bias",), grow_bias(qf.vocab_size)))
  return rules


def head_rules(vision_proj: str, text_proj: str) -> list[Rule]:
  """The two projections (named as the checkpoint names them) and `itm_head`."""
  rules = _linear("vision_proj", vision_proj) + _linear("text_proj", text_proj)
  return rules + _linear("itm_head", "itm_head")


def bert_rules(model_cfg: ml_collections.ConfigDict) -> list[Rule]:
  """The Q-Former's text weights from a BERT checkpoint (keys without the `bert.` prefix).

  `qformer.vocab_size` is BERT's vocabulary + 1, or more with padding: the `[DEC]` row and any
  padding rows are the mean word embedding (as transformers' `resize_token_embeddings` starts
  new rows), their LM bias 0.
  """
  qf = model_cfg.qformer

  def fold_token_type(positions: np.ndarray, token_types: np.ndarray) -> np.ndarray:
    return positions + token_types[0]

  position = Rule(
    "qformer/embeddings/position_embeddings/embedding",
    ("embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"),
    fold_token_type,
  )
  rules = text_embedding_rules(qf, "embeddings.", "embeddings.LayerNorm", position)
  for i in range(qf.num_layers):
    t, s = f"qformer/layers/{i}", f"encoder.layer.{i}"
    rules += _attention_rules(f"{t}/attention", f"{s}.attention", "self")
    rules += _ffn_rules(t, s, query_suffix="")
  return rules + lm_head_rules(qf, "cls.predictions.")


def _grow_rows(x: np.ndarray, rows: int, fill: np.ndarray) -> np.ndarray:
  """x (V, ...) with rows V..rows - 1 appended, each `fill` (...); x itself when V >= rows, so
  that `assign` reports a checkpoint larger than the model as mis-shaped."""
  extra = rows - x.shape[0]
  if extra <= 0:
    return x
  fill = np.broadcast_to(np.asarray(fill, x.dtype), (extra,) + x.shape[1:])
  return np.concatenate([x, fill], axis=0)


def grow_embedding(rows: int) -> Callable[[np.ndarray], np.ndarray]:
  """Convert for a word-embedding table (V, H) -> (rows, H): new rows ([DEC] from BERT, the
  vocabulary's padding) are the mean row."""
  return lambda w: _grow_rows(w, rows, w.mean(axis=0))


def grow_bias(rows: int) -> Callable[[np.ndarray], np.ndarray]:
  """Convert for an LM bias (V,) -> (rows,): new entries are 0."""
  return lambda b: _grow_rows(b, rows, np.zeros((), b.dtype))


# -- model configuration from the folders ---------------------------------------------------------


def _hf_size(value) -> int:
  """HF sizes may be an int or an (h, w) pair; only square ones fit the model."""
  if isinstance(value, list | tuple):
    if len(set(value)) != 1:
      raise ValueError(f"non-square size {value} in the BLIP-2 config; the ViT needs a square one")
    return int(value[0])
  return int(value)


def _require_gelu(where: str, act: str) -> None:
  if act != "gelu":
    raise ValueError(f"{where}.hidden_act={act!r} is not supported; the model uses exact 'gelu'")


def blip2_config(
  folder: str, base: ml_collections.ConfigDict, tokenizer=None
) -> ml_collections.ConfigDict:
  """`base` (a full config) with the model sizes of the BLIP-2 checkpoint in `folder`.

  Takes the ViT, Q-Former, query, projection and vocabulary sizes from config.json (defaults
  filled in by transformers' `Blip2Config`). Token ids come from `tokenizer` when given
  ([CLS], and [DEC] as its BOS token); otherwise [DEC] is the last id. The VQ-VAE is not part of
  BLIP-2: its sizes stay `base`'s, with its geometry (patch grid, query grid) fitted to the
  checkpoint's ViT and query count. `data.image_size` and `data.max_text_len` follow.
  """
  from transformers import Blip2Config

  hf_files.read_config(folder)  # a clear error for a missing or broken config.json
  hf = Blip2Config.from_pretrained(folder)
  v, q = hf.vision_config, hf.qformer_config
  _require_gelu("vision_config", v.hidden_act)
  _require_gelu("qformer_config", q.hidden_act)
  if not q.use_qformer_text_input:
    raise ValueError(
      f"{folder}: qformer_config.use_qformer_text_input is false, so the checkpoint has no "
      "Q-Former text weights; import from a Blip2ForImageTextRetrieval checkpoint instead"
    )
  config = copy.deepcopy(base)
  m = config.model
  m.vit.image_size = _hf_size(v.image_size)
  m.vit.patch_size = _hf_size(v.patch_size)
  m.vit.width = v.hidden_size
  m.vit.depth = v.num_hidden_layers
  m.vit.num_heads = v.num_attention_heads
  m.vit.mlp_dim = v.intermediate_size
  m.vit.layer_norm_eps = float(v.layer_norm_eps)
  m.vit.qkv_bias = bool(v.qkv_bias)
  qf = m.qformer
  qf.hidden_size = q.hidden_size
  qf.num_layers = q.num_hidden_layers
  qf.num_heads = q.num_attention_heads
  qf.intermediate_size = q.intermediate_size
  qf.cross_attention_freq = q.cross_attention_frequency
  qf.num_queries = hf.num_query_tokens
  qf.vocab_size = q.vocab_size
  qf.max_position_embeddings = q.max_position_embeddings
  qf.layer_norm_eps = float(q.layer_norm_eps)
  qf.hidden_dropout = float(q.hidden_dropout_prob)
  qf.attention_dropout = float(q.attention_probs_dropout_prob)
  qf.pad_token_id = q.pad_token_id if q.pad_token_id is not None else qf.pad_token_id
  qf.dec_token_id = q.vocab_size - 1
  if tokenizer is not None:
    _token_ids_from(tokenizer, qf)
  m.embed_dim = hf.image_text_hidden_size
  m.max_text_len = min(m.max_text_len, q.max_position_embeddings)
  fit_vqvae_geometry(m)
  return config_lib.derive(config)  # data.image_size, data.max_text_len, ... follow the model


def folder_tokenizer(folder: str):
  """The folder's BERT tokenizer with `[DEC]` added, or None when it ships no vocabulary."""
  from medunifier_jax.data.tokenizer import VOCAB_FILES, load_tokenizer

  if not any(os.path.isfile(os.path.join(folder, f)) for f in VOCAB_FILES):
    return None
  return load_tokenizer(folder)


def _token_ids_from(tokenizer, qf: ml_collections.ConfigDict) -> None:
  if tokenizer.cls_token_id is not None:
    qf.cls_token_id = tokenizer.cls_token_id
  if tokenizer.pad_token_id is not None:
    qf.pad_token_id = tokenizer.pad_token_id
  if tokenizer.bos_token == "[DEC]":
    qf.dec_token_id = tokenizer.bos_token_id


def fit_vqvae_geometry(m: ml_collections.ConfigDict) -> None:
  """Sets `vqvae.grid` and `vqvae.query_grid` from the ViT and the query count, in place.

  The patch grid is image_size / patch_size; the queries are read as the most nearly square
  grid (4x8 for 32). What cannot be derived (the decoder's depth for the image size) is left to
  `config_lib.check_geometry`, whose error lists what to change.
  """
  vq, s, p, n = m.vqvae, m.vit.image_size, m.vit.patch_size, m.qformer.num_queries
  vq.grid = s // p
  if vq.query_grid[0] * vq.query_grid[1] != n:
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    vq.query_grid = type(vq.query_grid)((a, n // a))  # a list when read back from JSON
  config_lib.check_geometry(m)


def bert_config_mismatches(folder: str, model_cfg: ml_collections.ConfigDict) -> dict[str, tuple]:
  """Q-Former fields that differ from the BERT checkpoint: {field: (config value, needed)}.

  `vocab_size` fits from BERT's vocabulary + 1 ([DEC]) up to `VOCAB_PADDING` - 1 rows more
  (vocabulary padding); the value named as needed is the unpadded one.
  """
  hf = hf_files.read_config(folder)
  _require_gelu("BERT config", hf.get("hidden_act", "gelu"))
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{folder}: only absolute position embeddings are supported")
  need = {
    "hidden_size": hf["hidden_size"],
    "num_layers": hf["num_hidden_layers"],
    "num_heads": hf["num_attention_heads"],
    "intermediate_size": hf["intermediate_size"],
    "vocab_size": hf["vocab_size"] + 1,  # [DEC] appended
    "dec_token_id": hf["vocab_size"],
    "max_position_embeddings": hf["max_position_embeddings"],
    "layer_norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
  }
  qf = model_cfg.qformer
  mismatches = {k: (qf[k], v) for k, v in need.items() if qf[k] != v}
  if need["vocab_size"] <= qf.vocab_size < need["vocab_size"] + VOCAB_PADDING:
    mismatches.pop("vocab_size", None)  # [DEC] and padding rows: both are grown on import
  return mismatches


def bert_config(folder: str, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`base` (a full config) with the Q-Former sized like the BERT checkpoint in `folder`.

  Token ids ([CLS], [PAD]) come from the folder's tokenizer when it ships one.
  """
  config = copy.deepcopy(base)
  for key, (_, value) in bert_config_mismatches(folder, config.model).items():
    config.model.qformer[key] = value
  tokenizer = folder_tokenizer(folder)
  if tokenizer is not None:
    _token_ids_from(tokenizer, config.model.qformer)
  config.model.max_text_len = min(
    config.model.max_text_len, config.model.qformer.max_position_embeddings
  )
  return config_lib.derive(config)  # data.max_text_len, ... follow the model


# -- import ---------------------------------------------------------------------------------


def import_blip2(
  model: nnx.Module, model_cfg: ml_collections.ConfigDict, folder: str, *, allow: Iterable[str] = ()
) -> ImportReport:
  """Writes the BLIP-2 checkpoint in `folder` into `model` (built from `model_cfg`).

  Args:
    allow: glob patterns of model weights that may stay at init and checkpoint tensors that
      may go unused; `BLIP2_NOT_IN_CHECKPOINT` names what a BLIP-2 file never has.
  Raises:
    WeightImportError: listing missing, unexpected and mis-shaped weights.
  """
  tensors = hf_files.read_weights(folder)
  return assign(model, blip2_rules(model_cfg), tensors, allow=allow, ignore=BUFFERS, source=folder)


def import_bert(
  model: nnx.Module, model_cfg: ml_collections.ConfigDict, folder: str, *, allow: Iterable[str] = ()
) -> ImportReport:
  """Writes a BERT checkpoint in `folder` into the Q-Former's text weights of `model`.

  Accepts `BertModel` and `BertForMaskedLM` files (a `bert.` prefix is removed). The MLM
  decoder is tied to the word embeddings in the model; a file whose decoder differs from its
  word embeddings is refused rather than silently untied.

  Args:
    allow: as in `import_blip2`; `BERT_NOT_IN_CHECKPOINT` names everything a BERT file never
      has (the vision side, cross-attention, heads, VQ-VAE) and its unused pooler.
  Raises:
    ValueError: when `model_cfg.qformer` does not match the BERT config (the message lists the
      fields and values); WeightImportError as in `import_blip2`.
  """
  check_bert_fits(folder, model_cfg)
  return assign(
    model,
    bert_rules(model_cfg),
    read_bert_tensors(folder),
    allow=allow,
    ignore=BUFFERS,
    source=folder,
  )


def check_bert_fits(folder: str, model_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming every Q-Former field that differs from the BERT in `folder`, with
  the overrides that fix them."""
  mismatches = bert_config_mismatches(folder, model_cfg)
  if mismatches:
    fields = ", ".join(
      f"qformer.{k}={have!r} (BERT needs {need!r})"
      for k, (have, need) in sorted(mismatches.items())
    )
    overrides = " ".join(
      f"--config.model.qformer.{k}={need}" for k, (_, need) in sorted(mismatches.items())
    )
    raise ValueError(
      f"the model configuration does not match the BERT checkpoint in {folder}: {fields}. "
      f"Use weights.hf_import.bert_config(folder, config), or set {overrides}"
    )


def read_bert_tensors(folder: str) -> dict[str, np.ndarray]:
  """The BERT folder's tensors without the `bert.` prefix and without the tied MLM decoder."""
  tensors = {k.removeprefix("bert."): v for k, v in hf_files.read_weights(folder).items()}
  drop_tied_decoder(tensors, folder)
  return tensors


def drop_tied_decoder(
  tensors: dict[str, np.ndarray], source: str, head: str = "", body: str = ""
) -> None:
  """Removes the MLM decoder weight/bias, which are tied copies of the word embeddings and the
  prediction bias; an untied decoder is refused.

  head, body: key prefixes of the LM head (`cls.`) and of the encoder (`embeddings.`), e.g.
  `Qformer.` and `Qformer.bert.` in BLIP-2's own files.
  """
  for key, tied_to in (
    (f"{head}cls.predictions.decoder.weight", f"{body}embeddings.word_embeddings.weight"),
    (f"{head}cls.predictions.decoder.bias", f"{head}cls.predictions.bias"),
  ):
    if key not in tensors:
      continue
    if tied_to in tensors and not np.array_equal(tensors[key], tensors[tied_to]):
      raise ValueError(
        f"{source}: {key} differs from {tied_to}; the model ties its output layer to the "
        "word embeddings and cannot hold an untied decoder"
      )
    del tensors[key]
