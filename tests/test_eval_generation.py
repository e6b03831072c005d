"""Decoding on hand-built step functions: beam search optimality, greedy parity, sampling."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medunifier_jax import generation as gen

PAD, BOS, EOS = 0, 1, 2
TOKENS = gen.SpecialTokens(bos=BOS, eos=EOS, pad=PAD)


def markov_step(table):
  """A second-order Markov "model": logits = table[previous token, current token].

  The state holds each row's previous token, so a beam search that reorders rows wrongly
  reads the wrong history and scores sequences differently from the brute force below.
  """

  def step(state, token_ids, position):
    del position
    return table[state["prev"], token_ids], {"prev": token_ids, "shared": state["shared"]}

  def init(rows):
    # "shared" has no row axis: beam search must leave it alone.
    return {"prev": jnp.full((rows,), PAD, jnp.int32), "shared": jnp.zeros((3,))}

  return step, init


def brute_force(table, max_length, min_length, length_penalty):
  """Best normalised log-probability over every sequence (HF conventions, see generation)."""
  logp = np.asarray(jax.nn.log_softmax(table, axis=-1), np.float64)
  vocab = table.shape[-1]
  best = (-np.inf, None)
  for n in range(1, max_length):
    for body in itertools.product(range(vocab), repeat=n):
      if EOS in body[:-1]:
        continue
      seq, prev, total = [BOS], PAD, 0.0
      for t in body:
        step_logp = logp[prev, seq[-1], t]
        if t == EOS and len(seq) < min_length:
          step_logp = -np.inf
        prev, total = seq[-1], total + step_logp
        seq.append(t)
      ended = body[-1] == EOS
      if not ended and n < max_length - 1:
        continue  # unfinished and not at the length limit: not a complete hypothesis
      score = total / n**length_penalty
      if score > best[0]:
        best = (score, seq)
  return best


@pytest.mark.parametrize("max_length, min_length, length_penalty", [(5, 3, 0.0), (5, 2, 1.0)])
def test_beam_search_finds_the_best_sequence(max_length, min_length, length_penalty):
  vocab = 5
  table = jnp.asarray(
    np.random.default_rng(max_length * 10 + min_length).normal(size=(vocab, vocab, vocab)) * 2.0,
    jnp.float32,
  )
  step, init = markov_step(table)
  # Enough beams to keep every prefix alive: beam search becomes exhaustive.
  config = gen.DecodingConfig(
    num_beams=vocab ** (max_length - 1),
    max_length=max_length,
    min_length=min_length,
    length_penalty=length_penalty,
    early_stopping=True,
  )
  out = jax.jit(lambda: gen.beam_search(step, init, 1, TOKENS, config))()
  score, seq = brute_force(table, max_length, min_length, length_penalty)
  got = [int(t) for t in out.tokens[0]]
  assert got[: len(seq)] == seq and all(t == PAD for t in got[len(seq) :])
  assert float(out.scores[0]) == pytest.approx(score, abs=1e-4)


def test_beam_search_beats_greedy_on_a_hand_built_table():
  # From BOS: A (0.6) or B (0.4). After A every continuation is poor (max 0.4);
  # after B, EOS has 0.9. Greedy: BOS A ... ; 2 beams: BOS B EOS (0.36 > 0.24).
  a, b = 3, 4
  probs = np.full((5, 5), 1e-6)
  probs[BOS, [a, b]] = [0.6, 0.4]
  probs[a, [a, b, EOS]] = [0.3, 0.3, 0.4]
  probs[b, [EOS, a]] = [0.9, 0.1]
  table = jnp.asarray(np.log(probs / probs.sum(1, keepdims=True)), jnp.float32)
  step = lambda state, tok, pos: (table[tok], state)
  init = lambda rows: jnp.zeros((rows,))
  config = gen.DecodingConfig(num_beams=2, max_length=6, min_length=0, length_penalty=0.0)
  beam = gen.beam_search(step, init, 1, TOKENS, config)
  greedy = gen.sample(
    step, init, 1, TOKENS, gen.DecodingConfig(method="greedy", max_length=6, min_length=0)
  )
  assert beam.tokens[0, :3].tolist() == [BOS, b, EOS]
  assert float(beam.scores[0]) == pytest.approx(np.log(0.4 * 0.9), abs=1e-4)
  assert greedy.tokens[0, :3].tolist() == [BOS, a, EOS]


@pytest.mark.parametrize("length_penalty", [0.0, 2.0])
def test_one_beam_is_greedy(length_penalty):
  # Eight rows, each with its own table slice: eight independent greedy/beam comparisons.
  rng = np.random.default_rng(int(length_penalty * 10))
  tables = jnp.asarray(rng.normal(size=(8, 6, 6, 6)) * 2.0, jnp.float32)

  def step(state, token_ids, position):
    row = jnp.arange(token_ids.shape[0]) % 8
    return tables[row, state, token_ids], token_ids

  init = lambda rows: jnp.full((rows,), PAD, jnp.int32)
  beam = gen.beam_search(
    step,
    init,
    8,
    TOKENS,
    gen.DecodingConfig(num_beams=1, max_length=9, min_length=3, length_penalty=length_penalty),
  )
  greedy = gen.sample(
    step, init, 8, TOKENS, gen.DecodingConfig(method="greedy", max_length=9, min_length=3)
  )
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  assert len({tuple(r) for r in np.asarray(greedy.tokens).tolist()}) > 1


def test_min_length_and_padding_after_eos():
  # EOS is the most likely token everywhere; min_length 4 keeps it out of positions 1..3.
  table = jnp.zeros((5, 5)).at[:, EOS].set(5.0)
  step = lambda state, tok, pos: (table[tok], state)
  init = lambda rows: jnp.zeros((rows,))
  for method in ("greedy", "beam"):
    out = gen.decode(
      step, init, 2, TOKENS, gen.DecodingConfig(method=method, max_length=8, min_length=4)
    )
    row = out.tokens[0].tolist()
    assert row[0] == BOS and EOS not in row[1:4] and row[4] == EOS
    assert row[5:] == [PAD] * 3


def test_nucleus_sampling_keeps_the_nucleus_and_is_seeded():
  # Token 3 has 70% of the mass, token 4 25%, the rest 5%: top_p 0.5 keeps only token 3,
  # top_p 0.9 keeps tokens 3 and 4 and never the tail.
  probs = np.array([0.01, 0.02, 0.02, 0.70, 0.25])
  table = jnp.log(jnp.asarray(np.tile(probs, (5, 1)), jnp.float32))
  step = lambda state, tok, pos: (table[tok], state)
  init = lambda rows: jnp.zeros((rows,))
  # One compilation per setting; the second key reuses it.
  run = jax.jit(gen.decode, static_argnums=(0, 1, 2, 3, 4))
  narrow_config = gen.DecodingConfig(method="nucleus", max_length=30, min_length=30, top_p=0.5)
  narrow = run(step, init, 4, TOKENS, narrow_config, jax.random.key(0))
  assert np.all(np.asarray(narrow.tokens[:, 1:]) == 3)
  wide_config = gen.DecodingConfig(method="nucleus", max_length=30, min_length=30, top_p=0.9)
  wide = np.asarray(run(step, init, 4, TOKENS, wide_config, jax.random.key(0)).tokens)
  assert set(np.unique(wide[:, 1:])) == {3, 4}
  other_key = run(step, init, 4, TOKENS, wide_config, jax.random.key(1)).tokens
  assert not np.array_equal(wide, other_key)
  with pytest.raises(ValueError, match="PRNG key"):
    gen.decode(step, init, 1, TOKENS, wide_config)


def test_state_rows_may_sit_on_any_axis():
  init = lambda rows: {"layered": jnp.zeros((2, rows, 3)), "shared": jnp.zeros((4,))}
  axes = gen._row_axes(init, 6)
  assert axes == {"layered": 1, "shared": None}
  state = {"layered": jnp.arange(12.0).reshape(2, 6, 1), "shared": jnp.arange(4.0)}
  moved = gen._reorder_rows(state, {"layered": 1, "shared": None}, jnp.array([5, 4, 3, 2, 1, 0]))
  np.testing.assert_array_equal(moved["layered"][0, :, 0], [5, 4, 3, 2, 1, 0])
  np.testing.assert_array_equal(moved["shared"], state["shared"])


def test_bad_settings_raise_with_the_fix():
  with pytest.raises(ValueError, match="choose one of"):
    gen.DecodingConfig(method="top_k")
  with pytest.raises(ValueError, match="min_length"):
    gen.DecodingConfig(max_length=5, min_length=6)
  assert gen.DecodingConfig.from_mapping({"num_beams": 2, "datasets": ("x",)}).num_beams == 2
