"""BERT WordPiece tokenizer: loaded from a folder, or trained on the report corpus.

The model reads text as BERT WordPiece ids. A tokenizer comes from one of two places:

* a Hugging Face BERT tokenizer folder (`vocab.txt` and/or `tokenizer.json`), e.g. the one
  next to BERT-base or BLIP-2 weights (`config.data.tokenizer_dir`);
* training on the report corpus with the `tokenizers` library (`tokenizer_dir` empty). The
  result is saved in the same format (`vocab.txt`, `tokenizer.json`, `tokenizer_config.json`),
  so `transformers.BertTokenizerFast.from_pretrained(folder)` loads it. Trained vocabularies
  start with the special tokens `[PAD] [UNK] [CLS] [SEP] [MASK]` (ids 0-4).

Either way `[DEC]` is then added as the beginning-of-sequence token with the id right after
the vocabulary, so for a vocabulary of V tokens the model needs `qformer.dec_token_id = V` and
`qformer.vocab_size >= V + 1` (`check_tokenizer` says which value to change). Saved folders hold
the plain vocabulary; `[DEC]` is added every time one is loaded.

Training is deterministic. The `tokenizers` WordPiece trainer numbers the continuation pieces
(`##a`, `##b`, ...) in hash-map order, and its merge ties are broken by those numbers, so two
processes could learn different vocabularies from the same text. Declaring every `##c` piece
up front, in sorted order, fixes their numbers and with them every tie.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from medunifier_jax.data import text as text_lib

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEC_TOKEN = "[DEC]"
VOCAB_FILES = ("vocab.txt", "tokenizer.json")
# Bumped whenever training changes, so cached vocabularies from older code are not reused.
_TRAINING_VERSION = 1


def _is_remote(path: str) -> bool:
  """gs://, s3:// and other URLs are read through etils.epath (as orbax does)."""
  return "://" in str(path)


def load_tokenizer(folder: str):
  """Loads a BERT WordPiece tokenizer from `folder` and adds `[DEC]` (id = vocabulary size).

  `folder` may be local or a URL such as gs://... (its files are copied to a temporary folder).

  Returns:
    A `transformers.BertTokenizerFast`.
  """
  if _is_remote(folder):
    from etils import epath

    remote = epath.Path(folder)
    with tempfile.TemporaryDirectory() as local:
      if remote.is_dir():
        for f in remote.iterdir():
          if f.name in (*VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json"):
            (epath.Path(local) / f.name).write_bytes(f.read_bytes())
      _check_folder(local, shown_as=folder, exists=remote.is_dir())
      return _load_local(local, shown_as=folder)
  _check_folder(folder, shown_as=folder, exists=os.path.isdir(folder))
  return _load_local(folder, shown_as=folder)


def _check_folder(folder: str, shown_as: str, exists: bool) -> None:
  if not exists:
    raise FileNotFoundError(
      f"tokenizer folder {shown_as} does not exist; set config.data.tokenizer_dir to a BERT "
      "tokenizer folder (vocab.txt or tokenizer.json), or to '' to train one on the reports"
    )
  if not any(os.path.isfile(os.path.join(folder, f)) for f in VOCAB_FILES):
    raise FileNotFoundError(
      f"tokenizer folder {shown_as} has no vocab.txt/tokenizer.json; point "
      "config.data.tokenizer_dir at a BERT tokenizer folder, or set it to '' to train a "
      "WordPiece vocabulary on the report corpus"
    )


def _load_local(folder: str, shown_as: str):
  from transformers import BertTokenizerFast  # Imported here: ~1 s, only when needed.

  tokenizer = BertTokenizerFast.from_pretrained(folder)
  if DEC_TOKEN not in tokenizer.get_vocab():
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
  else:
    tokenizer.bos_token = DEC_TOKEN
  dec_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
  if dec_id != len(tokenizer) - 1:
    raise ValueError(
      f"{DEC_TOKEN} has id {dec_id} in tokenizer folder {shown_as}, but it must be the last "
      f"id ({len(tokenizer) - 1}); remove {DEC_TOKEN} (and tokens after it) from its vocabulary"
    )
  return tokenizer


def _bert_backend():
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

  tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  return tok


def train_vocabulary(texts: Sequence[str], vocab_size: int, min_frequency: int = 2) -> list[str]:
  """Learns a WordPiece vocabulary of exactly `vocab_size` tokens (BERT uncased rules).

  The special tokens come first, in the order of SPECIAL_TOKENS. If the corpus supports fewer
  tokens than asked for, `[unusedN]` fillers (as in BERT's own vocabulary) make up the size.

  Returns:
    The tokens, index = id.
  """
  from tokenizers import trainers

  if not texts:
    raise ValueError("cannot train a tokenizer on an empty corpus; the source has no reports")
  backend = _bert_backend()
  # Every character the pre-tokenizer can emit: the normalised text minus whitespace. The BERT
  # normaliser works character by character, so normalising each distinct character suffices.
  normalize = backend.normalizer.normalize_str
  chars = sorted({c for raw in set("".join(texts)) for c in normalize(raw) if not c.isspace()})
  continuations = [f"##{c}" for c in chars]
  smallest = len(SPECIAL_TOKENS) + 2 * len(chars)
  if vocab_size < smallest:
    raise ValueError(
      f"tokenizer_vocab_size {vocab_size} is too small for this corpus: its {len(chars)} "
      f"characters need {smallest} tokens (specials, characters and ## pieces); set "
      f"config.data.tokenizer_vocab_size >= {smallest}"
    )
  trainer = trainers.WordPieceTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=[*SPECIAL_TOKENS, *continuations],
    limit_alphabet=len(chars),
    show_progress=False,
  )
  backend.train_from_iterator(texts, trainer)
  vocab = backend.get_vocab(with_added_tokens=False)
  tokens = sorted(vocab, key=vocab.get)
  tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
  assert tuple(tokens[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS, tokens[:8]
  return tokens


def save_vocabulary(tokens: Sequence[str], folder: str) -> None:
  """Writes `tokens` (index = id) as a BERT tokenizer folder.

  Files: vocab.txt, tokenizer.json and tokenizer_config.json.
  """
  from transformers import BertTokenizerFast

  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("".join(f"{t}\n" for t in tokens))
  # Built from vocab.txt like any BERT folder; saving adds tokenizer.json and its config.
  BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)


def train_tokenizer(texts: Sequence[str], vocab_size: int, folder: str, min_frequency: int = 2):
  """Trains a WordPiece vocabulary on `texts`, saves it to `folder`, and loads it back.

  Returns:
    A `transformers.BertTokenizerFast` with `[DEC]` at id `vocab_size`.
  """
  save_vocabulary(train_vocabulary(texts, vocab_size, min_frequency), folder)
  return load_tokenizer(folder)


def corpus_key(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> str:
  """A short hash naming a trained vocabulary: same corpus and settings, same key."""
  h = hashlib.sha256(f"wordpiece-v{_TRAINING_VERSION}-{vocab_size}-{min_frequency}".encode())
  for t in texts:
    h.update(b"\0" + t.encode("utf-8"))
  return h.hexdigest()[:16]


def clean_corpus(data_config: Any, corpus: Iterable[str]) -> list[str]:
  """Raw report texts as the model sees them: `text.clean_report` with the config's
  `max_words` (the default for configs without the field)."""
  max_words = data_config.get("max_words", text_lib.DEFAULT_MAX_WORDS)
  return [text_lib.clean_report(t, max_words) for t in corpus]


def get_tokenizer(
  data_config: Any, corpus: Iterable[str] | None = None, cache_dir: str | None = None
):
  """The tokenizer the configuration asks for.

  Args:
    data_config: `config.data`; uses `tokenizer_dir`, `tokenizer_vocab_size` and (if present)
      `max_words`.
    corpus: raw report texts (the training split), needed when `tokenizer_dir` is empty. They
      are cleaned with `text.clean_report`, as the model will see them.
    cache_dir: where trained vocabularies are kept (e.g. the work directory), in a sub-folder
      named by the hash of corpus and size, so each is trained once. None trains into a
      temporary folder.

  Returns:
    A `transformers.BertTokenizerFast` with `[DEC]` as BOS token.
  """
  if data_config.tokenizer_dir:
    return load_tokenizer(data_config.tokenizer_dir)
  if corpus is None:
    raise ValueError(
      "config.data.tokenizer_dir is empty, so a WordPiece vocabulary is trained on the "
      "reports: pass the training reports as `corpus`, or set config.data.tokenizer_dir"
    )
  texts = clean_corpus(data_config, corpus)
  size = int(data_config.tokenizer_vocab_size)
  if cache_dir is None:
    with tempfile.TemporaryDirectory() as tmp:
      return train_tokenizer(texts, size, tmp)
  name = f"tokenizer-wordpiece{size}-{corpus_key(texts, size)}"
  if _is_remote(cache_dir):
    _cache_remote(texts, size, f"{str(cache_dir).rstrip('/')}/{name}")
    return load_tokenizer(f"{str(cache_dir).rstrip('/')}/{name}")
  folder = os.path.join(cache_dir, name)
  if not os.path.isfile(os.path.join(folder, "vocab.txt")):
    # Train next to the target and rename, so a concurrent reader never sees half a folder.
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=cache_dir)
    try:
      save_vocabulary(train_vocabulary(texts, size), tmp)
      try:
        os.rename(tmp, folder)
      except OSError:  # Another process finished first with the identical vocabulary.
        pass
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return load_tokenizer(folder)


def _cache_remote(texts: Sequence[str], size: int, folder: str) -> None:
  """Trains into a local folder and uploads it; vocab.txt goes last, marking it complete."""
  from etils import epath

  remote = epath.Path(folder)
  if (remote / "vocab.txt").exists():
    return
  with tempfile.TemporaryDirectory() as local:
    save_vocabulary(train_vocabulary(texts, size), local)
    remote.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(local), key=lambda n: n == "vocab.txt"):
      (remote / name).write_bytes((epath.Path(local) / name).read_bytes())


# The configs pad the Q-Former's vocabulary to a multiple of this (its rows shard over the model
# axis); the rows past [DEC] are never fed or predicted.
VOCAB_MULTIPLE = 128


def padded_vocab_size(n: int) -> int:
  """`n` rounded up to a multiple of VOCAB_MULTIPLE."""
  return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_tokenizer(tokenizer, model_config: Any) -> None:
  """Raises ValueError unless `tokenizer` fits `config.model` (ids of [DEC], [CLS], [PAD])."""
  qf = model_config.qformer
  dec_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
  if dec_id != qf.dec_token_id:
    raise ValueError(
      f"the tokenizer's {DEC_TOKEN} id is {dec_id} (its vocabulary has {dec_id} tokens) but "
      f"config.model.qformer.dec_token_id is {qf.dec_token_id}; set "
      f"config.model.qformer.dec_token_id={dec_id} and config.model.qformer.vocab_size="
      f"{padded_vocab_size(dec_id + 1)}, or use a tokenizer with {qf.dec_token_id} tokens (when "
      f"training one: config.data.tokenizer_vocab_size={qf.dec_token_id})"
    )
  if qf.vocab_size < dec_id + 1:
    raise ValueError(
      f"config.model.qformer.vocab_size is {qf.vocab_size} but the tokenizer needs "
      f"{dec_id + 1} ids (vocabulary + {DEC_TOKEN}); set it to at least {dec_id + 1} "
      f"({padded_vocab_size(dec_id + 1)}: padded to a multiple of {VOCAB_MULTIPLE}, so it "
      "can shard)"
    )
  for name, want in (("cls", qf.cls_token_id), ("pad", qf.pad_token_id)):
    got = getattr(tokenizer, f"{name}_token_id")
    if got != want:
      raise ValueError(
        f"the tokenizer's [{name.upper()}] id is {got} but config.model.qformer."
        f"{name}_token_id is {want}; set config.model.qformer.{name}_token_id={got}"
      )


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
  """Tokenizes cleaned texts to a fixed length: `[CLS] ... [SEP]` then `[PAD]`, truncated.

  Returns:
    `input_ids` and `attention_mask`, int32 (B, max_len).

  Raises:
    TypeError: `texts` is a single str, or holds something other than str.
    ValueError: a text is empty or whitespace only (its index is named). Such a text would
      encode as a bare `[CLS] [SEP]`, an embedding of nothing that still scores against every
      image, so it is refused rather than passed on.
  """
  if isinstance(texts, str):
    raise TypeError("tokenize takes a list of texts; wrap a single text in a list")
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str: {t!r:.80}")
    if not t.strip():
      raise ValueError(
        f"texts[{i}] is empty{' (whitespace only)' if t else ''}: {t!r:.80}; give every text "
        "at least one word (a text made only of the characters cleaning removes, such as "
        "'()' or ':', is empty after cleaning too)"
      )
  enc = tokenizer(
    list(texts),
    padding="max_length",
    truncation=True,
    max_length=max_len,
    return_attention_mask=True,
    return_token_type_ids=False,
  )
  return {
    "input_ids": np.asarray(enc["input_ids"], np.int32).reshape(len(texts), max_len),
    "attention_mask": np.asarray(enc["attention_mask"], np.int32).reshape(len(texts), max_len),
  }


def fixed_length_encoder(tokenizer, max_len: int):
  """A standalone copy of the tokenizer's Rust backend that pads and truncates to `max_len`.

  Gives the same ids as `tokenize`, at a fraction of the per-call cost, and pickles without
  `transformers` (worker processes start faster). Returns a `tokenizers.Tokenizer`.
  """
  from tokenizers import Tokenizer

  # A copy through JSON: the backend object itself is shared with `tokenizer`.
  encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
  encoder.enable_truncation(max_length=max_len)
  encoder.enable_padding(
    length=max_len, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token
  )
  return encoder


def encode(encoder, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """`tokenize` with an encoder from `fixed_length_encoder`: int32 (B, max_len) arrays."""
  encodings = encoder.encode_batch(list(texts))
  return {
    "input_ids": np.asarray([e.ids for e in encodings], np.int32),
    "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
  }
