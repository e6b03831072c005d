"""grain pipeline: values, determinism, checkpointed state, host sharding, global batches."""

import io

import grain
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec
from PIL import Image

from configs import pretrain
from medunifier_jax.data import pipeline, registry, text
from medunifier_jax.data import tokenizer as tok_lib
from medunifier_jax.training import sharding as sharding_lib

STORED = 40  # stored image size; the tiny config's 48 px forces a resize
F = 12


class ListSource:
  """A random-access source held in memory; records follow the source contract."""

  def __init__(self, n, seed=0):
    rng = np.random.default_rng(seed)
    self.images = rng.integers(0, 256, (n, STORED, STORED), dtype=np.uint8)
    self.labels = rng.integers(0, 2, (n, F)).astype(np.float32)
    sizes = ("small", "moderate", "large")
    self.reports = [
      f"Case {i}: {sizes[i % 3]} right pleural effusion (XXXX, XXXX). Heart size normal."
      for i in range(n)
    ]

  def __len__(self):
    return len(self.reports)

  def __getitem__(self, i):
    return {
      "image": self.images[i],
      "report": self.reports[i],
      "labels": self.labels[i],
      "label": i % 3,
      "id": f"case-{i}",
    }


def _config(batch_size=8, **data):
  c = ml_collections.ConfigDict(pretrain.get_config("tiny").to_dict())
  c.batch_size = batch_size
  c.data.update(data)
  return c


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  c = _config()
  return tok_lib.get_tokenizer(c.data, ListSource(64).reports, str(tmp_path_factory.mktemp("t")))


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_values_follow_the_source(tokenizer):
  c, src = _config(), ListSource(40)
  (batch,) = _take(
    iter(pipeline.train_dataset(c, tokenizer, source=src, shard_index=0, shard_count=1)), 1
  )
  assert sorted(batch) == [
    "attention_mask",
    "image",
    "index",
    "input_ids",
    "label",
    "labels",
    "target_image",
  ]
  assert batch["image"].shape == batch["target_image"].shape == (8, 48, 48, 3)
  assert batch["input_ids"].shape == (8, 24) and batch["input_ids"].dtype == np.int32
  mean, std = np.array(c.data.image_mean), np.array(c.data.image_std)
  for row, i in enumerate(batch["index"]):
    resized = Image.fromarray(src.images[i]).resize((48, 48), Image.Resampling.BICUBIC)
    unit = np.asarray(resized, np.float32) / 255.0
    np.testing.assert_allclose(batch["target_image"][row], np.stack([unit] * 3, -1), atol=1e-6)
    np.testing.assert_allclose(
      batch["image"][row], (np.stack([unit] * 3, -1) - mean) / std, atol=1e-5
    )
    np.testing.assert_array_equal(batch["labels"][row], src.labels[i])
    assert batch["label"][row] == i % 3
    ids = batch["input_ids"][row][batch["attention_mask"][row] == 1]
    expected = tok_lib.tokenize(tokenizer, [text.clean_report(src.reports[i])], 24)
    np.testing.assert_array_equal(batch["input_ids"][row], expected["input_ids"][0])
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert f"case {i} " in tokenizer.decode(ids, skip_special_tokens=True)


def test_same_seed_same_batches_and_each_epoch_is_a_new_permutation(tokenizer):
  src = ListSource(40)
  make = lambda seed: iter(
    pipeline.train_dataset(
      _config(shuffle_seed=seed), tokenizer, source=src, shard_index=0, shard_count=1
    )
  )
  first, again, other = _take(make(0), 10), _take(make(0), 10), _take(make(1), 10)
  _assert_same(first, again)
  order = np.concatenate([b["index"] for b in first])
  assert not np.array_equal(order, np.concatenate([b["index"] for b in other]))
  epoch0, epoch1 = order[:40], order[40:]  # 5 batches of 8 per epoch
  assert sorted(epoch0) == sorted(epoch1) == list(range(40))
  assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(40))


def test_restored_state_replays_the_following_batches(tokenizer, tmp_path):
  import orbax.checkpoint as ocp

  c, src = _config(), ListSource(40)
  make = lambda: iter(
    pipeline.train_dataset(c, tokenizer, source=src, shard_index=0, shard_count=1)
  )
  it = make()
  _take(it, 3)  # mid-epoch (5 batches per epoch); the next 4 cross into epoch 2
  state = it.get_state()
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(it))
  expected = _take(it, 4)

  fresh = make()
  fresh.set_state(state)
  _assert_same(_take(fresh, 4), expected)
  via_orbax = make()
  checkpointer.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(via_orbax))
  _assert_same(_take(via_orbax, 4), expected)


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_see_disjoint_examples_covering_the_data(tokenizer, hosts):
  c, src = _config(), ListSource(40)
  seen = []
  for h in range(hosts):
    ds = pipeline.train_dataset(
      c, tokenizer, source=src, shard_index=h, shard_count=hosts, num_epochs=1
    )
    batches = list(ds)
    assert len(batches) == 5 and all(len(b["index"]) == 8 // hosts for b in batches)
    seen.append(np.concatenate([b["index"] for b in batches]))
  everything = np.concatenate(seen)
  assert len(everything) == len(set(everything.tolist())) == 40
  # The shards interleave a global permutation rather than cutting the data in blocks.
  assert not all(
    np.array_equal(np.sort(s), np.arange(h * len(s), (h + 1) * len(s))) for h, s in enumerate(seen)
  )
  # Global batch k (the hosts' k-th batches in host order) is batch k of a one-host run, in order.
  one_host = [
    b["index"]
    for b in pipeline.train_dataset(
      c, tokenizer, source=src, shard_index=0, shard_count=1, num_epochs=1
    )
  ]
  per_host = [np.split(s, 5) for s in seen]
  for k, want in enumerate(one_host):
    np.testing.assert_array_equal(np.concatenate([p[k] for p in per_host]), want)


def test_eval_batches_pad_with_a_mask_and_cover_every_example_once(tokenizer):
  c, src = _config(), ListSource(37)
  seen, counts = [], set()
  for h in range(4):
    batches = list(pipeline.eval_dataset(c, tokenizer, source=src, shard_index=h, shard_count=4))
    counts.add(len(batches))
    assert all(b["mask"].dtype == np.bool_ and b["index"].shape == (2,) for b in batches)
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask[: mask.sum()].all() and not mask[mask.sum() :].any()  # padding at the end
    np.testing.assert_array_equal(index[mask], np.arange(h, 37, 4))  # in order, no shuffle
    seen.append(index[mask])
  assert counts == {5}  # ceil(ceil(37 / 4) / 2): every host takes part in every step
  assert sorted(np.concatenate(seen).tolist()) == list(range(37))


def test_global_batch_shards_over_the_data_axis(tokenizer):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  ds = pipeline.eval_dataset(
    _config(), tokenizer, source=ListSource(8), shard_index=0, shard_count=1
  )
  (host,) = list(ds)
  arrays = sharding_lib.global_batch(host, mesh)
  assert arrays.keys() == host.keys()
  for key, x in arrays.items():
    assert isinstance(x, jax.Array) and x.shape == host[key].shape
    assert x.sharding.spec == PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(x), host[key])
    assert len(x.addressable_shards) == 8
    for shard in x.addressable_shards:  # 2 rows per data position, replicated over "model"
      rows = shard.index[0]
      assert rows.stop - rows.start == 2
      np.testing.assert_array_equal(np.asarray(shard.data), host[key][rows])
  with pytest.raises(ValueError, match="multiple of 4"):
    sharding_lib.global_batch({"index": np.arange(6)}, mesh)


def test_alignment_text_rides_in_training_batches_only(tokenizer):
  """alignment_text "affirmed": training batches carry the report without its negated
  sentences as align_ids / align_mask beside the whole report; evaluation batches do not."""
  src = ListSource(40)
  src.reports = [f"Case {i}. Heart enlarged. No effusion (XXXX)." for i in range(40)]
  c = _config(alignment_text="affirmed")
  (batch,) = _take(
    iter(pipeline.train_dataset(c, tokenizer, source=src, shard_index=0, shard_count=1)), 1
  )
  (plain,) = _take(
    iter(pipeline.train_dataset(_config(), tokenizer, source=src, shard_index=0, shard_count=1)), 1
  )
  assert "align_ids" not in plain and batch.keys() == plain.keys() | {"align_ids", "align_mask"}
  for key in plain:
    np.testing.assert_array_equal(batch[key], plain[key], err_msg=key)
  for row, i in enumerate(batch["index"]):
    expected = tok_lib.tokenize(tokenizer, [f"Case {i}. Heart enlarged."], 24)
    np.testing.assert_array_equal(batch["align_ids"][row], expected["input_ids"][0])
    np.testing.assert_array_equal(batch["align_mask"][row], expected["attention_mask"][0])
    assert batch["align_mask"][row].sum() < batch["attention_mask"][row].sum()
  (evaluated,) = _take(iter(pipeline.eval_dataset(c, tokenizer, source=src, batch_size=8)), 1)
  assert "align_ids" not in evaluated
  with pytest.raises(ValueError, match="alignment_text is 'negated'; set it to one of"):
    pipeline.train_dataset(
      _config(alignment_text="negated"), tokenizer, source=src, shard_index=0, shard_count=1
    )


def test_clear_errors_for_bad_batch_size_and_bad_records(tokenizer, monkeypatch):
  src = ListSource(40)
  with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
    pipeline.train_dataset(_config(), tokenizer, source=src, shard_index=0, shard_count=3)
  with pytest.raises(ValueError, match="fewer than one host batch"):
    pipeline.train_dataset(
      _config(batch_size=32), tokenizer, source=ListSource(20), shard_index=0, shard_count=1
    )
  processor = pipeline.ExampleProcessor.from_config(src, tokenizer, _config().data)
  src.images = src.images[:, :, :, None].repeat(2, axis=-1)  # (H, W, 2): not an image
  with pytest.raises(ValueError, match="record case-0: expected a grayscale"):
    processor(0)
  monkeypatch.setattr(registry, "SOURCE_MODULES", ())  # no need to import the real sets here
  with pytest.raises(registry.UnknownDataSetError, match="known data sets"):
    pipeline.train_dataset(_config(name="no_such_set"), tokenizer, shard_index=0, shard_count=1)


def test_stored_image_formats_give_the_same_example(tokenizer):
  record = ListSource(2)[1]
  data = _config().data
  reference = pipeline.ExampleProcessor.from_config([record], tokenizer, data)(0)
  png = io.BytesIO()
  Image.fromarray(record["image"]).save(png, format="PNG")
  gray = record["image"]
  for stored in (png.getvalue(), gray[:, :, None], np.stack([gray] * 3, -1)):
    processor = pipeline.ExampleProcessor.from_config([dict(record, image=stored)], tokenizer, data)
    np.testing.assert_allclose(processor(0)["target_image"], reference["target_image"], atol=1e-6)
  bad = pipeline.ExampleProcessor.from_config([dict(record, image=b"not a png")], tokenizer, data)
  with pytest.raises(ValueError, match="record case-1: image bytes cannot be decoded"):
    bad(0)


def test_registry_registers_by_name_and_reports_broken_modules(monkeypatch, tmp_path):
  def factory(split, data_config):
    return ListSource(3, seed=len(split))

  registry.register("list_source_for_tests", factory)
  registry.register("list_source_for_tests", factory)  # re-import of the same module: fine
  assert len(registry.get_source("list_source_for_tests", "val", None)) == 3
  with pytest.raises(ValueError, match="already registered"):
    registry.register("list_source_for_tests")(lambda split, data_config: None)
  monkeypatch.setattr(registry, "SOURCE_MODULES", ())
  assert "list_source_for_tests" in registry.known_names()
  # A registering module whose own imports fail is an error, not a silently missing set.
  (tmp_path / "broken_sources_for_tests.py").write_text("import no_such_dependency_for_tests\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(registry, "SOURCE_MODULES", ("broken_sources_for_tests",))
  with pytest.raises(ModuleNotFoundError, match="no_such_dependency_for_tests"):
    registry.known_names()


def test_phantom_openi_source_through_the_registry(tokenizer):
  c = _config()
  src = registry.get_source("phantom_openi", "train", c.data)
  assert len(src) == c.data.num_train
  batches = _take(
    iter(pipeline.train_dataset(c, tokenizer, source=src, shard_index=0, shard_count=1)), 2
  )
  for b in batches:
    assert np.isfinite(b["image"]).all() and 0 <= b["target_image"].min()
    assert b["target_image"].max() <= 1 and b["target_image"].std() > 0.05
    assert (b["attention_mask"].sum(1) > 3).all()


def test_worker_processes_give_the_same_batches(tokenizer):
  # Batch k is a function of k alone, so worker processes change speed, not content.
  src = ListSource(40)
  make = lambda workers: iter(
    pipeline.train_dataset(
      _config(worker_count=workers), tokenizer, source=src, shard_index=0, shard_count=1
    )
  )
  expected = _take(make(0), 4)
  it = make(2)
  try:
    got = _take(it, 4)
  finally:
    it.close()
  _assert_same(got, expected)
  assert all(type(x) is np.ndarray for b in got for x in b.values())
