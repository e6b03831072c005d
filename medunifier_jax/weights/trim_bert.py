"""A BERT folder cut down to the tokens a report corpus uses, and optionally to its first layers.

BERT's 30,522-token vocabulary makes the Q-Former's word embeddings and its LM head (tied to
them) 30,522 rows wide, though a radiology corpus uses a few thousand of those tokens. The LM
head's (B * T, H) x (H, V) product then dominates report generation's cost at small widths.
`trim_bert` keeps the rows of the tokens the corpus produces (and the special tokens), in
BERT's order, and writes a folder that `hf-bert:` imports like any other:

  tokens kept:  ids  k_0 < k_1 < ... < k_{n-1}   (BERT's ids; [PAD] = 0 stays 0)
  new id:       i for the token of BERT id k_i
  word embeddings (30522, H) -> (n, H): rows k_0 .. k_{n-1}

WordPiece is greedy longest-match-first, so on words made only of kept pieces the trimmed
vocabulary splits every corpus text exactly as the full one does (`trim_bert` checks this on the
corpus and refuses to write a folder otherwise). Text outside the corpus may split differently
or fall back to [UNK] more often: the folder is meant for training on that corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from medunifier_jax.weights import hf_files

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
_VOCAB_ROWS = (
  "cls.predictions.bias",
  "cls.predictions.decoder.weight",
  "cls.predictions.decoder.bias",
)


@dataclasses.dataclass
class TrimReport:
  """What `trim_bert` wrote: sizes before and after, and the corpus it was checked on."""

  folder: str
  vocab_before: int
  vocab_after: int
  layers_before: int
  layers_after: int
  num_texts: int
  num_tokens: int  # WordPiece tokens over the corpus, [CLS]/[SEP] not counted


def _layer_of(key: str) -> int | None:
  """`encoder.layer.3.attention...` (with or without a `bert.` prefix) -> 3; None otherwise."""
  parts = key.split(".")
  for i in range(len(parts) - 2):
    if parts[i] == "encoder" and parts[i + 1] == "layer" and parts[i + 2].isdigit():
      return int(parts[i + 2])
  return None


def _strip_prefix(key: str) -> str:
  return key.removeprefix("bert.")


def trim_bert(
  folder: str, out: str, texts: Sequence[str], *, num_layers: int | None = None
) -> TrimReport:
  """Writes to `out` the BERT in `folder` with only the vocabulary `texts` use.

  Args:
    folder: a Hugging Face BERT folder (config.json, weights, vocab.txt or tokenizer.json).
    out: the folder to write (created; an existing folder is replaced as a whole, and a
      failure leaves no half-written folder behind).
    texts: the corpus, as the model will see it (e.g. cleaned training reports).
    num_layers: keep the first this many encoder layers (None: all).
  Returns:
    A `TrimReport`.
  Raises:
    ValueError: a `num_layers` outside 1..layers, or a trimmed vocabulary that splits some
      corpus text differently from the full one.
  """
  from transformers import BertTokenizerFast

  config = hf_files.read_config(folder)
  layers = int(config["num_hidden_layers"])
  keep_layers = layers if num_layers is None else int(num_layers)
  if not 1 <= keep_layers <= layers:
    raise ValueError(f"num_layers={num_layers} must be between 1 and {layers} ({folder})")

  full = BertTokenizerFast.from_pretrained(folder)
  vocab = full.get_vocab()
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(f"{folder}: the vocabulary lacks the special tokens {missing}")
  encoded = full(list(texts), add_special_tokens=False)["input_ids"]
  used = {i for ids in encoded for i in ids} | {vocab[t] for t in SPECIAL_TOKENS}
  kept = np.array(sorted(used))
  by_id = {i: t for t, i in vocab.items()}
  tokens = [by_id[int(i)] for i in kept]

  tensors = hf_files.read_weights(folder)
  emb_key = next((k for k in tensors if _strip_prefix(k) == _WORD_EMBEDDINGS), None)
  if emb_key is None:
    raise ValueError(f"{folder}: no {_WORD_EMBEDDINGS} among its weights")
  rows = tensors[emb_key].shape[0]
  trimmed = {}
  for key, value in tensors.items():
    layer = _layer_of(key)
    if layer is not None and layer >= keep_layers:
      continue
    if key == emb_key or (_strip_prefix(key) in _VOCAB_ROWS and value.shape[0] == rows):
      value = value[kept]
    trimmed[key] = np.ascontiguousarray(value)

  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".trim-bert-", dir=parent)
  try:
    with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
      f.write("".join(f"{t}\n" for t in tokens))
    lower = bool(getattr(full, "do_lower_case", True))
    BertTokenizerFast(os.path.join(tmp, "vocab.txt"), do_lower_case=lower).save_pretrained(tmp)
    small = BertTokenizerFast.from_pretrained(tmp)
    new_id = {int(k): i for i, k in enumerate(kept)}
    again = small(list(texts), add_special_tokens=False)["input_ids"]
    for n, (text, ids, got) in enumerate(zip(texts, encoded, again, strict=True)):
      if got != [new_id[i] for i in ids]:
        raise ValueError(
          f"the trimmed vocabulary splits corpus text {n} differently from {folder}'s: "
          f"{text[:80]!r}; the folder was not written"
        )
    config = dict(config, vocab_size=len(tokens), num_hidden_layers=keep_layers)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    from safetensors.numpy import save_file

    save_file(trimmed, os.path.join(tmp, hf_files.SAFETENSORS))
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return TrimReport(
    folder=out,
    vocab_before=rows,
    vocab_after=len(tokens),
    layers_before=layers,
    layers_after=keep_layers,
    num_texts=len(encoded),
    num_tokens=sum(len(ids) for ids in encoded),
  )


def training_texts(config) -> list[str]:
  """The training split's reports of `config.data`, cleaned as the pipeline cleans them."""
  from medunifier_jax.data import pipeline, registry
  from medunifier_jax.data import tokenizer as tokenizer_lib

  source = registry.get_source(config.data.name, "train", config.data)
  return tokenizer_lib.clean_corpus(config.data, pipeline.source_reports(source))


def run_overrides(folder: str, config) -> list[str]:
  """The command-line overrides that start a run of `config` from the trimmed `folder`: its
  Q-Former sizes and token ids (vocabulary padded to the configs' multiple of 128), the import
  source and the tokenizer."""
  from medunifier_jax.data import tokenizer as tokenizer_lib
  from medunifier_jax.weights import hf_import

  sized = hf_import.bert_config(folder, config)
  qf = sized.model.qformer
  values = {
    f"model.qformer.{k}": qf[k]
    for k in (
      "hidden_size",
      "num_layers",
      "num_heads",
      "intermediate_size",
      "max_position_embeddings",
      "layer_norm_eps",
      "dec_token_id",
      "cls_token_id",
      "pad_token_id",
    )
    if qf[k] != config.model.qformer[k]
  }
  values["model.qformer.vocab_size"] = tokenizer_lib.padded_vocab_size(qf.dec_token_id + 1)
  values["init_from.qformer"] = f"hf-bert:{folder}"
  values["data.tokenizer_dir"] = folder
  return [f"--config.{k}={v}" for k, v in values.items()]
