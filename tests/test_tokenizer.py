"""WordPiece tokenizer: trained vocabulary format, [DEC], determinism, caching and errors."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from transformers import BertTokenizerFast

from configs import pretrain
from medunifier_jax.data import text
from medunifier_jax.data import tokenizer as tok_lib

VOCAB = 512  # the tiny configuration's vocabulary (dec_token_id 512, vocab_size 513)
_WORDS = (
  "heart size normal lungs clear no effusion pneumothorax consolidation mild moderate severe "
  "left right bilateral basilar atelectasis opacity cardiomegaly edema pleural stable enlarged "
  "silhouette mediastinal contours within limits granuloma calcified nodule XXXX"
).split()


def _corpus(n=300, seed=0):
  rng = random.Random(seed)
  return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(n)]


def _data_config(**overrides):
  c = pretrain.get_config("tiny")
  d = ml_collections.ConfigDict(c.data.to_dict())
  d.update(overrides)
  return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tok") / "wordpiece")
  return folder, tok_lib.train_tokenizer(_corpus(), VOCAB, folder)


def test_tokenize_refuses_an_empty_text_by_index(trained):
  _, tok = trained
  with pytest.raises(ValueError, match=r"texts\[0\] is empty: ''; give every text at least "):
    tok_lib.tokenize(tok, [""], max_len=8)
  with pytest.raises(ValueError, match=r"texts\[1\] is empty \(whitespace only\)"):
    tok_lib.tokenize(tok, ["heart", " \t\n"], max_len=8)
  # A text made only of what cleaning removes arrives empty (as from api.Model.tokenize).
  with pytest.raises(ValueError, match=r"texts\[2\] is empty"):
    tok_lib.tokenize(tok, [text.clean_report(t) for t in ("heart", "lungs", "(:;)")], 8)
  with pytest.raises(TypeError, match="wrap a single text in a list"):
    tok_lib.tokenize(tok, "heart", max_len=8)
  with pytest.raises(TypeError, match=r"texts\[0\] is a NoneType"):
    tok_lib.tokenize(tok, [None], max_len=8)


def test_trained_folder_has_bert_layout_and_special_order(trained):
  folder, tok = trained
  assert {"tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= set(os.listdir(folder))
  with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
    vocab = f.read().splitlines()
  assert len(vocab) == VOCAB and len(set(vocab)) == VOCAB
  assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert [
    tok.pad_token_id,
    tok.unk_token_id,
    tok.cls_token_id,
    tok.sep_token_id,
    tok.mask_token_id,
  ] == [0, 1, 2, 3, 4]
  # [DEC] comes right after the vocabulary: the model's vocabulary is one larger.
  assert tok.bos_token == "[DEC]" and tok.bos_token_id == VOCAB == len(tok) - 1
  # Every report word is a single token (the corpus is small), so nothing maps to [UNK].
  ids = tok("heart cardiomegaly granuloma", add_special_tokens=False)["input_ids"]
  assert len(ids) == 3 and tok.unk_token_id not in ids


def test_plain_transformers_loads_the_saved_folder_identically(trained, tmp_path):
  folder, tok = trained
  plain = BertTokenizerFast.from_pretrained(folder)
  assert len(plain) == VOCAB  # saved without [DEC]
  sample = "Mild cardiomegaly. No pleural effusion, XXXX right basilar atelectasis."
  assert plain(sample)["input_ids"] == tok(sample)["input_ids"]
  # vocab.txt alone (a classic BERT folder) gives the same ids too.
  shutil.copy(os.path.join(folder, "vocab.txt"), tmp_path / "vocab.txt")
  from_vocab = tok_lib.load_tokenizer(str(tmp_path))
  assert from_vocab(sample)["input_ids"] == tok(sample)["input_ids"]
  assert from_vocab.bos_token_id == VOCAB


def test_round_trip_and_fixed_length(trained):
  _, tok = trained
  report = "Heart size normal; lungs clear (no effusion). Comparison XXXX, XXXX."
  cleaned = text.clean_report(report)
  enc = tok_lib.tokenize(tok, [cleaned, "heart"], max_len=24)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert ids.shape == mask.shape == (2, 24) and ids.dtype == mask.dtype == np.int32
  n = int(mask[0].sum())
  assert ids[0, 0] == tok.cls_token_id and ids[0, n - 1] == tok.sep_token_id
  assert (ids[0, n:] == tok.pad_token_id).all() and (mask[0, :n] == 1).all()
  # Decoding rejoins punctuation: "effusion ." (")" removed by cleaning) comes back "effusion.".
  unspaced = lambda s: re.sub(r"\s+([.,])", r"\1", s)
  assert unspaced(tok.decode(ids[0], skip_special_tokens=True)) == unspaced(cleaned.lower())
  assert ids[1, :3].tolist() == [
    tok.cls_token_id,
    tok.convert_tokens_to_ids("heart"),
    tok.sep_token_id,
  ]
  # Truncation keeps [SEP] as the last token.
  short = tok_lib.tokenize(tok, [cleaned], max_len=6)["input_ids"][0]
  assert short[-1] == tok.sep_token_id and (short[1:-1] == ids[0, 1:5]).all()


def test_training_is_deterministic_across_processes(tmp_path):
  # The trainer's hash-map order changes per process; run it in two fresh processes.
  corpus_file = tmp_path / "corpus.json"
  corpus_file.write_text(json.dumps(_corpus(seed=1)))
  code = (
    "import json, sys; from medunifier_jax.data.tokenizer import train_vocabulary; "
    "print(json.dumps(train_vocabulary(json.load(open(sys.argv[1])), 300)))"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  outs = [
    subprocess.run(
      [sys.executable, "-c", code, str(corpus_file)],
      cwd=root,
      check=True,
      capture_output=True,
      text=True,
    ).stdout
    for _ in range(2)
  ]
  assert outs[0] == outs[1]
  assert json.loads(outs[0]) == tok_lib.train_vocabulary(_corpus(seed=1), 300)


def test_get_tokenizer_trains_once_per_corpus_and_size(tmp_path):
  corpus = _corpus(seed=2)
  tok = tok_lib.get_tokenizer(_data_config(), corpus, str(tmp_path))
  (folder,) = os.listdir(tmp_path)
  vocab_file = tmp_path / folder / "vocab.txt"
  stamp = os.stat(vocab_file).st_mtime_ns
  again = tok_lib.get_tokenizer(_data_config(), corpus, str(tmp_path))
  assert os.listdir(tmp_path) == [folder] and os.stat(vocab_file).st_mtime_ns == stamp
  assert again.get_vocab() == tok.get_vocab()
  tok_lib.get_tokenizer(_data_config(), corpus[:-1], str(tmp_path))
  assert len(os.listdir(tmp_path)) == 2  # another corpus, another vocabulary
  # A configured folder wins over training.
  loaded = tok_lib.get_tokenizer(_data_config(tokenizer_dir=str(tmp_path / folder)))
  assert loaded.get_vocab() == tok.get_vocab()


def test_missing_vocabulary_and_corpus_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"has no vocab.txt/tokenizer.json"):
    tok_lib.load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tok_lib.load_tokenizer(str(tmp_path / "absent"))
  with pytest.raises(ValueError, match="pass the training reports"):
    tok_lib.get_tokenizer(_data_config())
  with pytest.raises(ValueError, match=r"too small .* >= \d+"):
    tok_lib.train_vocabulary(_corpus(), 20)


def test_config_mismatch_names_both_numbers(trained):
  _, tok = trained
  tok_lib.check_tokenizer(tok, pretrain.get_config("tiny").model)  # 512 + [DEC] fits
  with pytest.raises(ValueError, match=r"\[DEC\] id is 512 .*\.dec_token_id is 2048"):
    tok_lib.check_tokenizer(tok, pretrain.get_config("demo").model)
  model = ml_collections.ConfigDict(pretrain.get_config("tiny").model.to_dict())
  model.qformer.vocab_size = 512
  with pytest.raises(ValueError, match="vocab_size is 512 .* needs 513"):
    tok_lib.check_tokenizer(tok, model)
  model.qformer.vocab_size, model.qformer.cls_token_id = 513, 101
  with pytest.raises(ValueError, match=r"\[CLS\] id is 2 .*\.cls_token_id is 101"):
    tok_lib.check_tokenizer(tok, model)


def test_fixed_length_encoder_matches_transformers(trained):
  _, tok = trained
  texts = _corpus(n=20, seed=3) + ["heart " * 40, "Comparison XXXX. Stable."]
  for max_len in (6, 24):
    fast = tok_lib.encode(tok_lib.fixed_length_encoder(tok, max_len), texts)
    reference = tok_lib.tokenize(tok, texts, max_len)
    for key in ("input_ids", "attention_mask"):
      assert fast[key].dtype == np.int32 and fast[key].shape == (len(texts), max_len)
      np.testing.assert_array_equal(fast[key], reference[key])
  # The pipeline's encoder takes the empty report of sets without reports ([CLS] [SEP]), which
  # `tokenize`, the call for texts a user gives, refuses.
  empty = tok_lib.encode(tok_lib.fixed_length_encoder(tok, 6), [""])["input_ids"][0]
  assert empty.tolist() == [tok.cls_token_id, tok.sep_token_id, *[tok.pad_token_id] * 4]
  # The encoder is a copy: the tokenizer itself still neither pads nor truncates.
  assert len(tok("heart " * 40)["input_ids"]) == 42


def test_remote_cache_and_folder_go_through_epath(tmp_path, monkeypatch):
  # Treat a local path as a URL (gs://...): the same code path, without a bucket.
  monkeypatch.setattr(tok_lib, "_is_remote", lambda path: True)
  corpus = _corpus(seed=4)
  tok = tok_lib.get_tokenizer(_data_config(), corpus, str(tmp_path / "remote"))
  (folder,) = os.listdir(tmp_path / "remote")
  files = set(os.listdir(tmp_path / "remote" / folder))
  assert {"tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= files
  assert tok.bos_token_id == VOCAB
  monkeypatch.setattr(tok_lib, "train_vocabulary", None)  # a second call must not train
  again = tok_lib.get_tokenizer(_data_config(), corpus, str(tmp_path / "remote"))
  assert again.get_vocab() == tok.get_vocab()
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} has no vocab.txt"):
    tok_lib.load_tokenizer(str(tmp_path / "empty"))
