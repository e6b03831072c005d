r"""Step-time and FLOP/s benchmark of the training step, optionally against a PyTorch peer.

  python -m medunifier_jax.benchmark --config configs/pretrain.py:bench_xs \
      [--objectives itc,itm,itg,tig] [--steps 10] [--peak_flops matmul] [--peer pytorch]

Prints one JSON line: `median_step_s`, `examples_per_s`, `step_flops` (XLA's cost analysis of
the compiled step), `flops_per_s` (achieved) and, with `--peak_flops`, `mfu`. `--peak_flops`
takes the peak FLOP/s of one device (e.g. 197e12, a TPU v5e chip's bf16 peak) or `matmul`: the
best rate of a square fp32 matmul timed in the same process, so that `mfu` is then the share of
the dense matmul rate this machine reaches (on CPUs, whose nominal peak depends on clocks a VM
does not show, a peak that a step can be held to). With
`--peer pytorch` the same ITC+ITM work runs in the same process with transformers' BLIP-2
modules (`Blip2VisionModel` frozen, `Blip2QFormerModel`, `Blip2TextEmbeddings`, dropout 0.1,
AdamW) at the config's sizes, and the line holds both timings and their ratio.

  python -m medunifier_jax.benchmark --config configs/pretrain.py:demo \
      --prior_config configs/prior.py:demo [--flops_only]

times text-to-image sampling instead (`prior/cost.py`): images/s with random weights of these
sizes and the FLOPs per sampled image (text encoder + steps x prior passes + decoder).

  python -m medunifier_jax.benchmark --config configs/pretrain.py:demo --vs dropout_prng=rbg

compiles the step twice, as configured (A) and with the overrides (B), and times them in turn,
A B A B: wall and CPU seconds of each and the A/B ratios pair by pair, for comparing an option
on a machine whose speed drifts.

Inputs are synthetic batches of the config's shapes (the step's cost does not depend on pixel
values); the data pipeline is not part of the measurement.
"""

import ast
import json
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from medunifier_jax import compilation_cache, config_lib, host_memory, pretraining
from medunifier_jax.objectives import OBJECTIVES

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/pretrain.py:bench_xs")
_OBJECTIVES = flags.DEFINE_list(
  "objectives", ["itc", "itm", "itg", "tig"], "Objectives to train (the others get weight 0)."
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after the warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_string(
  "peak_flops",
  None,
  "Peak FLOP/s of one device, for MFU: a number, or `matmul` to measure a dense fp32 matmul "
  "in this process and use its rate.",
)
_PEER = flags.DEFINE_enum("peer", None, ["pytorch"], "Also time a peer implementation.")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for the PyTorch peer.")
_PRIOR_CONFIG = config_flags.DEFINE_config_file(
  "prior_config",
  None,
  "With it, time text-to-image sampling instead of the training step: "
  "images/s of a prior of this config (e.g. configs/prior.py:demo) over the --config "
  "MedUnifier, and the FLOPs per sampled image.",
)
_VS = flags.DEFINE_multi_string(
  "vs",
  [],
  "A config override FIELD=VALUE (repeatable) for a second step, B: the two compiled steps are "
  "then timed in turn, A B A B, and the line adds B's timings and the A/B ratio pair by pair.",
)
_SAMPLING_BATCH = flags.DEFINE_integer("sampling_batch", 16, "Reports per sampling call.")
_FLOPS_ONLY = flags.DEFINE_bool(
  "flops_only",
  False,
  "Sampling: only the FLOPs per image, from shapes (nothing allocated; for the paper sizes).",
)
flags.mark_flag_as_required("config")


def with_objectives(config, objectives):
  """A copy of `config` training only `objectives` (weights 1, the others 0)."""
  unknown = set(objectives) - set(OBJECTIVES)
  if unknown:
    raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {OBJECTIVES}")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for name in OBJECTIVES:
      config.loss_weights[name] = 1.0 if name in objectives else 0.0
  return config


def _median_time(fn, steps: int, warmup: int) -> tuple[float, list[float]]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def with_overrides(config, overrides: list[str]):
  """A copy of `config` with `FIELD=VALUE` overrides (VALUE a Python literal, else a string)."""
  changes = {}
  for item in overrides:
    field, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--vs takes FIELD=VALUE, got {item!r}")
    try:
      changes[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      changes[field] = value
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config_lib.override(config, changes)
  return config


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost.get("flops", float("nan")))


def benchmark_ab(config_a, config_b, steps: int, warmup: int) -> dict:
  """Both steps compiled, then timed in turn (A B A B ...): wall and CPU time (all of the
  process's threads, steadier than wall time on a shared machine) of each step, A/B per pair."""
  _, step_a, _ = pretraining.compile_synthetic_step(config_a)
  _, step_b, _ = pretraining.compile_synthetic_step(config_b)
  for _ in range(warmup):
    step_a()
    step_b()
  wall = {"a": [], "b": []}
  cpu = {"a": [], "b": []}
  for _ in range(steps):
    for name, fn in (("a", step_a), ("b", step_b)):
      t0, c0 = time.perf_counter(), time.process_time()
      fn()
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  out = {}
  for label, times in (("", wall), ("cpu_", cpu)):
    ratios = [a / b for a, b in zip(times["a"], times["b"], strict=True)]
    out[f"{label}median_step_s"] = statistics.median(times["a"])
    out[f"b_{label}median_step_s"] = statistics.median(times["b"])
    out[f"{label}a_over_b_median"] = statistics.median(ratios)
    out[f"{label}a_over_b"] = ratios
  out["step_times_s"], out["b_step_times_s"] = wall["a"], wall["b"]
  return out


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the fastest of `repeats` jitted (size, size) @ (size, size) fp32 matmuls on the
  default device (after one untimed call): the dense rate this machine reaches."""
  x = jax.random.normal(jax.random.key(0), (size, size), jax.numpy.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size**3 / best


def parse_peak(value: str | None) -> tuple[float | None, str]:
  """`--peak_flops` as (FLOP/s per device or None, where it came from)."""
  if not value:
    return None, ""
  if value == "matmul":
    return matmul_peak(), "measured: fp32 matmul 2048 x 2048, fastest of 5, this process"
  try:
    peak = float(value)
  except ValueError:
    raise app.UsageError(
      f"--peak_flops takes FLOP/s per device (e.g. 197e12) or 'matmul', got {value!r}"
    ) from None
  if peak <= 0:
    raise app.UsageError(f"--peak_flops must be positive, got {value!r}")
  return peak, "given"


def benchmark_jax(
  config, steps: int, warmup: int, peak_flops: float | None = None, peak_source: str = "given"
) -> dict:
  """Compiles the step ahead of time, then times `steps` calls on a synthetic batch."""
  compiled, one_step, compile_s = pretraining.compile_synthetic_step(config)
  flops = _flops(compiled)
  median, times = _median_time(one_step, steps, warmup)
  out = {
    "median_step_s": median,
    "examples_per_s": int(config.batch_size) / median,
    "step_flops": flops,
    "flops_per_s": flops / median,
    "compile_s": compile_s,
    "step_times_s": times,
    "devices": jax.device_count(),
    "platform": jax.devices()[0].platform,
  }
  if peak_flops:
    out["peak_flops"] = peak_flops
    out["peak_flops_source"] = peak_source
    out["mfu"] = out["flops_per_s"] / (peak_flops * jax.device_count())
  return out


def sampling(config, prior_config) -> dict:
  """Text-to-image sampling figures (`prior.cost`) with the prior config's decoding defaults."""
  from medunifier_jax.prior import cost

  steps, guidance = int(prior_config.sample.steps), float(prior_config.sample.guidance)
  guided = prior_config.model.condition == "text" and guidance != 0.0
  candidates = int(prior_config.sample.get("candidates", 1))
  result = {
    "config": config.get("variant", ""),
    "prior_config": prior_config.get("variant", ""),
    "flops": cost.sampling_flops(
      config, prior_config, steps=steps, guided=guided, candidates=candidates
    ),
  }
  if not _FLOPS_ONLY.value:
    result["speed"] = cost.sampling_speed(
      config,
      prior_config,
      batch_size=_SAMPLING_BATCH.value,
      steps=steps,
      guidance=guidance,
      candidates=candidates,
    )
  result["platform"] = jax.devices()[0].platform
  return result


def main(argv):
  del argv
  compilation_cache.disable()  # compile_s is a compile, never a read from a cache
  if _PRIOR_CONFIG.value is not None:
    print(json.dumps(sampling(_CONFIG.value, _PRIOR_CONFIG.value)))
    return
  if _VS.value and _PEAK.value:
    raise app.UsageError(
      "--vs times two steps against each other and prints no MFU: drop --peak_flops"
    )
  peak, peak_source = parse_peak(_PEAK.value)
  objectives = [o.strip() for o in _OBJECTIVES.value if o.strip()]
  config = with_objectives(_CONFIG.value, objectives)
  result = {
    "config": config.get("variant", ""),
    "objectives": objectives,
    "batch_size": int(config.batch_size),
    "steps": _STEPS.value,
  }
  if _PEER.value == "pytorch":
    if set(objectives) != {"itc", "itm"}:
      raise app.UsageError("--peer pytorch times ITC+ITM; pass --objectives itc,itm")
    from medunifier_jax import benchmark_torch

    peer = benchmark_torch.benchmark_pytorch(
      config, _STEPS.value, _WARMUP.value, threads=_THREADS.value
    )
  if _VS.value:
    result["vs"] = _VS.value
    result.update(
      benchmark_ab(config, with_overrides(config, _VS.value), _STEPS.value, _WARMUP.value)
    )
    print(json.dumps(result))
    return
  ours = benchmark_jax(config, _STEPS.value, _WARMUP.value, peak, peak_source)
  result.update(ours)
  if _PEER.value == "pytorch":
    result["pytorch"] = peer
    result["speedup_vs_pytorch"] = peer["median_step_s"] / ours["median_step_s"]
  print(json.dumps(result))


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()
  app.run(main)
