"""Report decoding in JAX: beam search, greedy and nucleus sampling over a key/value cache.

Every loop is a `jax.lax.while_loop` over fixed-shape buffers (sequences of `max_length`
tokens, a cache sized for `max_length`), so one decoding function compiles once per
(batch size, settings) and never retraces as reports get longer or shorter.

Decoding is written against an injectable step function,

  step_fn(state, token_ids (R,), position: int32 scalar) -> (logits (R, V), state)

which consumes the token at `position` for each of R rows and returns the logits of the next
token. `make_model_step` builds it from a MedUnifier model's `init_decode_cache` /
`decode_step` (whose logits give a padded vocabulary's padding ids `qformer.PADDING_LOGIT`, so
no method here ever picks one); tests use hand-built tables. Beam search reorders the state's
rows when beams are re-ranked; it finds each state array's row axis by building the state
abstractly for two row counts (`init_fn(R)` and `init_fn(2 R)`), so arrays shared by all rows
are left alone.

Conventions (those of Hugging Face `generate`, which the paper's code calls):
  * sequences start with the BOS token (`[DEC]`) at position 0; `max_length` and `min_length`
    count it, so at most `max_length - 1` tokens are generated and EOS is forbidden while the
    sequence (BOS included) is shorter than `min_length`;
  * a finished hypothesis scores sum(log p) / generated_length ** length_penalty, its length
    counting the EOS token; an EOS candidate joins the finished set only if it ranks among the
    top `num_beams` candidates of its step (so one beam is exactly greedy decoding);
  * `early_stopping=False` stops a row once it holds `num_beams` finished hypotheses and none
    of its live beams, normalised at the current length, scores better than the worst of them;
    `True` stops as soon as it holds `num_beams` finished hypotheses;
  * `repetition_penalty` p != 1 multiplies the log-probability of every token already in the
    sequence by p (CTRL's penalty applied, as Hugging Face beam search does, to log-probs).
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medunifier_jax import inference

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
InitFn = Callable[[int], Any]
METHODS = ("beam", "greedy", "nucleus")
_NEG_INF = -1e9  # finite, so that -inf - -inf never makes a NaN in the score arithmetic


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """Decoding settings; the defaults are the paper's (3 beams, 95 tokens, min 3, no penalty)."""

  method: str = "beam"
  num_beams: int = 3
  max_length: int = 95
  min_length: int = 3
  length_penalty: float = 1.0
  repetition_penalty: float = 1.0
  early_stopping: bool = False
  top_p: float = 0.9
  temperature: float = 1.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"decoding method {self.method!r} unknown; choose one of {METHODS}")
    if self.max_length < 2:
      raise ValueError(f"max_length must be >= 2 (BOS + one token), got {self.max_length}")
    if not 0 <= self.min_length <= self.max_length:
      raise ValueError(
        f"min_length must lie in [0, max_length={self.max_length}], got {self.min_length}"
      )
    if self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
    if self.temperature <= 0.0 or self.repetition_penalty <= 0.0:
      raise ValueError(
        "temperature and repetition_penalty must be > 0, got "
        f"{self.temperature} and {self.repetition_penalty}"
      )

  @property
  def rows_per_example(self) -> int:
    return self.num_beams if self.method == "beam" else 1

  @classmethod
  def from_mapping(cls, mapping) -> "DecodingConfig":
    """Builds from any mapping (e.g. a config dict), ignoring keys that are not settings."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(mapping).items() if k in names})


class DecodeOutput(NamedTuple):
  tokens: jax.Array  # (B, max_length) int32: BOS, generated tokens, EOS, then padding
  scores: jax.Array  # (B,) float32: beam score (beam), or sum of log-probabilities


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  bos: int
  eos: int
  pad: int


def decode(
  step_fn: StepFn,
  init_fn: InitFn,
  batch_size: int,
  tokens: SpecialTokens,
  config: DecodingConfig,
  rng: jax.Array | None = None,
) -> DecodeOutput:
  """Decodes `batch_size` sequences with the configured method (traceable; jit the caller).

  Args:
    step_fn: see the module docstring.
    init_fn: rows -> initial state for `rows` = batch_size * config.rows_per_example rows
      (beam search lays out rows example-major: row b * num_beams + k).
    batch_size: B.
    tokens: BOS / EOS / PAD ids.
    config: decoding settings.
    rng: PRNG key, needed by nucleus sampling only.
  """
  if config.method == "beam":
    return beam_search(step_fn, init_fn, batch_size, tokens, config)
  if config.method == "nucleus" and rng is None:
    raise ValueError("nucleus sampling needs a PRNG key: pass rng=jax.random.key(seed)")
  return sample(step_fn, init_fn, batch_size, tokens, config, rng)


def _log_probs(logits, presence, position, tokens: SpecialTokens, config: DecodingConfig):
  """(R, V) logits -> processed (R, V) float32 log-probabilities.

  As in Hugging Face beam search, the repetition penalty and the min-length EOS ban act on the
  log-probabilities (a banned EOS takes no mass from the other tokens).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if config.repetition_penalty != 1.0:
    logp = jnp.where(presence, logp * config.repetition_penalty, logp)
  # The sequence holds position + 1 tokens before this step appends one.
  ban_eos = position + 1 < config.min_length
  return logp.at[:, tokens.eos].set(jnp.where(ban_eos, _NEG_INF, logp[:, tokens.eos]))


def _initial_presence(rows: int, vocab_size: int, first: jax.Array, config: DecodingConfig):
  if config.repetition_penalty == 1.0:
    return jnp.zeros((rows, 1), bool)  # unused; keeps the loop state's structure fixed
  return jax.nn.one_hot(first, vocab_size, dtype=bool)


def sample(
  step_fn: StepFn,
  init_fn: InitFn,
  batch_size: int,
  tokens: SpecialTokens,
  config: DecodingConfig,
  rng: jax.Array | None = None,
) -> DecodeOutput:
  """Greedy decoding (config.method == "greedy") or nucleus sampling ("nucleus")."""
  length = config.max_length
  seqs = jnp.full((batch_size, length), tokens.pad, jnp.int32).at[:, 0].set(tokens.bos)
  state = init_fn(batch_size)
  logits0, _ = jax.eval_shape(step_fn, state, seqs[:, 0], jnp.int32(0))
  presence = _initial_presence(batch_size, logits0.shape[-1], seqs[:, 0], config)
  rng = jax.random.key(0) if rng is None else rng

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < length - 1) & ~jnp.all(done)

  def body(carry):
    i, seqs, state, done, total, presence = carry
    logits, state = step_fn(state, seqs[:, i], i)
    logp = _log_probs(logits, presence, i, tokens, config)
    if config.method == "greedy":
      tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    else:
      tok = _nucleus_sample(jax.random.fold_in(rng, i), logp / config.temperature, config.top_p)
    tok = jnp.where(done, tokens.pad, tok)
    total = total + jnp.where(done, 0.0, jnp.take_along_axis(logp, tok[:, None], 1)[:, 0])
    seqs = seqs.at[:, i + 1].set(tok)
    if config.repetition_penalty != 1.0:
      presence = presence | jax.nn.one_hot(tok, presence.shape[-1], dtype=bool)
    return i + 1, seqs, state, done | (tok == tokens.eos), total, presence

  carry = (
    jnp.int32(0),
    seqs,
    state,
    jnp.zeros((batch_size,), bool),
    jnp.zeros((batch_size,), jnp.float32),
    presence,
  )
  _, seqs, _, _, total, _ = jax.lax.while_loop(cond, body, carry)
  return DecodeOutput(seqs, total)


def _nucleus_sample(key, logits, top_p: float):
  """Samples from the smallest set of tokens whose probability reaches top_p (R, V) -> (R,)."""
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs = -jnp.sort(-probs, axis=-1)
  cum = jnp.cumsum(sorted_probs, axis=-1)
  # Keep a token if the mass before it is below top_p: the top token is always kept.
  keep_sorted = (cum - sorted_probs) < top_p
  threshold = jnp.min(jnp.where(keep_sorted, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  masked = jnp.where(probs >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def _row_axes(init_fn: InitFn, rows: int):
  """Per state leaf, the axis that indexes rows (None for leaves shared by all rows).

  Found by building the state abstractly for `rows` and `2 * rows` rows and seeing which axis
  doubles, so the state may keep its rows on any axis (e.g. (layers, rows, ...) caches).
  """
  one = jax.eval_shape(lambda: init_fn(rows))
  two = jax.eval_shape(lambda: init_fn(2 * rows))

  def axis(a, b):
    diff = [d for d, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    if not diff:
      return None
    if len(diff) > 1 or (a.shape[diff[0]], b.shape[diff[0]]) != (rows, 2 * rows):
      raise ValueError(
        f"cannot tell the row axis of a decoding-state array: shape {a.shape} "
        f"for {rows} rows, {b.shape} for {2 * rows}"
      )
    return diff[0]

  return jax.tree.map(axis, one, two)


def _reorder_rows(state, axes, index):
  """Gathers every per-row state array along its row axis by `index` (R,)."""
  take = lambda x, ax: x if ax is None else jnp.take(x, index, axis=ax)
  return jax.tree.map(take, state, axes, is_leaf=lambda x: x is None)


def beam_search(
  step_fn: StepFn, init_fn: InitFn, batch_size: int, tokens: SpecialTokens, config: DecodingConfig
) -> DecodeOutput:
  """Beam search with `config.num_beams` beams; returns the best finished hypothesis per row."""
  b, k, length = batch_size, config.num_beams, config.max_length
  rows = b * k
  lp = config.length_penalty
  norm = lambda logp, n: logp / jnp.asarray(n, jnp.float32) ** lp

  seqs = jnp.full((b, k, length), tokens.pad, jnp.int32).at[:, :, 0].set(tokens.bos)
  axes = _row_axes(init_fn, rows)
  state = init_fn(rows)
  logits0, _ = jax.eval_shape(step_fn, state, seqs[:, :, 0].reshape(rows), jnp.int32(0))
  vocab = logits0.shape[-1]
  presence = _initial_presence(rows, vocab, seqs[:, :, 0].reshape(rows), config)
  # Only the first beam is live at the start, so the first step does not pick k copies.
  live_logp = jnp.tile(jnp.array([0.0] + [_NEG_INF] * (k - 1), jnp.float32), (b, 1))
  fin_seqs = seqs
  fin_scores = jnp.full((b, k), _NEG_INF, jnp.float32)
  done = jnp.zeros((b,), bool)

  def cond(carry):
    i, done = carry[0], carry[-1]
    return (i < length - 1) & ~jnp.all(done)

  def body(carry):
    i, seqs, live_logp, state, presence, fin_seqs, fin_scores, done = carry
    logits, state = step_fn(state, seqs[:, :, i].reshape(rows), i)
    logp = _log_probs(logits, presence, i, tokens, config).reshape(b, k, vocab)
    cand = (live_logp[:, :, None] + logp).reshape(b, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # (b, 2k)
    top_beam, top_tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(seqs, top_beam[:, :, None], axis=1)
    top_seqs = top_seqs.at[:, :, i + 1].set(top_tok)
    is_eos = top_tok == tokens.eos
    gen_len = i + 1  # generated tokens, this one included

    # Finished: EOS candidates ranked within the top k; rows already done keep their set.
    new_scores = jnp.where(
      is_eos & (jnp.arange(2 * k) < k) & ~done[:, None], norm(top_logp, gen_len), _NEG_INF
    )
    fin_scores, fin_seqs = _top_k_merge(fin_scores, fin_seqs, new_scores, top_seqs, k)

    # Live: the best k candidates that did not end.
    live_cand = jnp.where(is_eos, _NEG_INF, top_logp)
    live_logp, pick = jax.lax.top_k(live_cand, k)
    seqs = jnp.take_along_axis(top_seqs, pick[:, :, None], axis=1)
    origin = jnp.take_along_axis(top_beam, pick, axis=1)  # (b, k) parent beam
    row_index = (jnp.arange(b)[:, None] * k + origin).reshape(rows)
    state = _reorder_rows(state, axes, row_index)
    if config.repetition_penalty != 1.0:
      new_tok = jnp.take_along_axis(top_tok, pick, axis=1).reshape(rows)
      presence = presence[row_index] | jax.nn.one_hot(new_tok, vocab, dtype=bool)

    full = jnp.all(fin_scores > _NEG_INF / 2, axis=1)
    if config.early_stopping:
      now_done = full
    else:
      now_done = full & (fin_scores.min(axis=1) >= norm(live_logp.max(axis=1), gen_len))
    return i + 1, seqs, live_logp, state, presence, fin_seqs, fin_scores, done | now_done

  carry = (jnp.int32(0), seqs, live_logp, state, presence, fin_seqs, fin_scores, done)
  i, seqs, live_logp, _, _, fin_seqs, fin_scores, done = jax.lax.while_loop(cond, body, carry)
  # Rows that ran out of length: their live beams compete with what finished.
  live_scores = jnp.where(done[:, None], _NEG_INF, norm(live_logp, i))
  fin_scores, fin_seqs = _top_k_merge(fin_scores, fin_seqs, live_scores, seqs, k)
  return DecodeOutput(fin_seqs[:, 0], fin_scores[:, 0])


def _top_k_merge(scores_a, seqs_a, scores_b, seqs_b, k: int):
  """Best k of two scored hypothesis sets per row; earlier entries win ties."""
  scores = jnp.concatenate([scores_a, scores_b], axis=1)
  seqs = jnp.concatenate([seqs_a, seqs_b], axis=1)
  best, idx = jax.lax.top_k(scores, k)
  return best, jnp.take_along_axis(seqs, idx[:, :, None], axis=1)


# ----------------------------------------------------------------------------- model glue


def make_model_step(model) -> StepFn:
  """The cached step of a MedUnifier model: `decode_step(cache, token_ids, position)`."""
  return lambda cache, token_ids, position: model.decode_step(cache, token_ids, position)


def generate_tokens(
  model,
  pixel_values: jax.Array,
  tokens: SpecialTokens,
  config: DecodingConfig,
  rng: jax.Array | None = None,
) -> DecodeOutput:
  """Images (B, S, S, 3) normalised -> decoded token ids (traceable; jit the caller)."""
  batch = pixel_values.shape[0]
  image_tokens = model.image_tokens(pixel_values)

  def init_fn(rows):
    # The model repeats each image's state rows // batch times in a row (one per beam).
    return model.init_decode_cache(image_tokens, rows, config.max_length)

  return decode(make_model_step(model), init_fn, batch, tokens, config, rng)


def generate_tokens_uncached(
  model,
  pixel_values: jax.Array,
  tokens: SpecialTokens,
  config: DecodingConfig,
  rng: jax.Array | None = None,
) -> DecodeOutput:
  """As `generate_tokens`, recomputing the whole prefix with `lm_logits` at every step.

  The reference the cached decoder must equal token for token; its cost grows with the square
  of the length, which is what the cache avoids.
  """
  batch, length = pixel_values.shape[0], config.max_length
  image_tokens = model.image_tokens(pixel_values)
  per_row = jnp.repeat(image_tokens, config.rows_per_example, axis=0)

  def step(prefix, token_ids, position):
    # The state is each row's prefix (R, max_length); beam search reorders it with the beams.
    prefix = prefix.at[:, position].set(token_ids)
    mask = jnp.broadcast_to(jnp.arange(length) <= position, prefix.shape).astype(jnp.int32)
    return model.lm_logits(per_row, prefix, mask)[:, position], prefix

  init_fn = lambda rows: jnp.zeros((rows, length), jnp.int32)
  return decode(step, init_fn, batch, tokens, config, rng)


def tokens_to_text(token_ids: np.ndarray, tokenizer, eos_id: int) -> list[str]:
  """(B, L) decoded ids (BOS first) -> B strings, cut at the first EOS."""
  out = []
  for row in np.asarray(token_ids):
    body = row[1:]
    stop = np.flatnonzero(body == eos_id)
    body = body[: stop[0]] if stop.size else body
    out.append(tokenizer.decode(body.tolist(), skip_special_tokens=True).strip())
  return out


class ReportGenerator:
  """Images -> report strings for one model graph (what `api.Model.generate_reports` needs).

  Decoders are compiled once per graph, decoding settings and image batch shape
  (`inference.compiled`), so every generator of one architecture shares them.

    generator = ReportGenerator(graphdef, tokenizer, dec_token_id=config.model.qformer.dec_token_id)
    reports = generator(state, pixel_values, DecodingConfig(num_beams=3))
  """

  def __init__(self, graphdef, tokenizer, dec_token_id: int):
    self.graphdef = graphdef
    self.tokenizer = tokenizer
    self.special = SpecialTokens(
      bos=int(dec_token_id), eos=int(tokenizer.sep_token_id), pad=int(tokenizer.pad_token_id)
    )

  def tokens(
    self, state, pixel_values, config: DecodingConfig | None = None, rng: jax.Array | None = None
  ) -> DecodeOutput:
    """(B, S, S, 3) normalised images -> decoded ids (B, max_length) and scores (B,)."""
    config = config or DecodingConfig()
    fn = inference.model_fns(self.graphdef).report_tokens(self.special, config)
    rng = jax.random.key(0) if rng is None else rng
    return fn(state, jnp.asarray(pixel_values, jnp.float32), rng)

  def __call__(
    self, state, pixel_values, config: DecodingConfig | None = None, rng: jax.Array | None = None
  ) -> list[str]:
    out = self.tokens(state, pixel_values, config, rng)
    return tokens_to_text(np.asarray(out.tokens), self.tokenizer, self.special.eos)


def measure_decoding_speed(
  generate_fn, model_state, pixel_values, config: DecodingConfig, repeats: int = 5
) -> dict[str, float]:
  """Generated tokens per second of a `ModelFns.report_tokens` function (compile excluded).

  Use `min_length == max_length` in `config` so every row decodes the full length and the
  figure is comparable across lengths. The fastest of `repeats` runs is reported (the least
  disturbed by other work on the machine).
  """
  rng = jax.random.key(0)
  jax.block_until_ready(generate_fn(model_state, pixel_values, rng))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(generate_fn(model_state, pixel_values, rng))
    times.append(time.perf_counter() - start)
  seconds = float(np.min(times))
  generated = pixel_values.shape[0] * (config.max_length - 1)
  return {
    "seconds": seconds,
    "tokens_per_s": generated / seconds,
    "max_length": config.max_length,
    "num_beams": config.rows_per_example,
  }
