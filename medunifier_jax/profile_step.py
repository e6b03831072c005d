r"""Where the training step's time goes: a profiler trace of the compiled step, by part and op kind.

  python -m medunifier_jax.profile_step --config configs/pretrain.py:bench_xs \
      --config.loss_weights.itg=0 --config.loss_weights.tig=0 [--steps 3] [--trace_dir DIR]

compiles the step on a synthetic batch (as `benchmark` does), records `--steps` calls with
`jax.profiler.trace` and sums the self time of every executed HLO op of the trace's .xplane.pb.
Each op is put in a part of the step by the Python call stack XLA keeps for it (the function
`objectives.compute_losses` called: the ViT, the shared query and text passes, ITC, ITM, ITG,
TIG; the optimizer update is everything outside the loss; backward ops keep their forward op's
stack) and in an op kind by its compiled HLO (matmul, convolution, RNG, reduction,
copy/transpose, elementwise, ...). Prints one JSON line with both tables in percent of op time.

On CPU the op times are summed over the thread pool's threads, so they add up to more than the
step's wall time when ops overlap; the shares are what to compare.
"""

import collections
import json
import re
import tempfile
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from medunifier_jax import host_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/pretrain.py:bench_xs")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps (after the warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untraced steps after compilation.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Where the trace goes (default: a temp dir).")
_TOP = flags.DEFINE_integer("top", 10, "Also list this many most expensive ops.")
flags.mark_flag_as_required("config")

# The function `compute_losses` calls -> the part of the step it is (first match, inner first).
_PARTS = {
  "MedUnifier.image_tokens": "vit",
  "MedUnifier.cross_kvs": "image_queries",
  "MedUnifier.image_queries_with_kv": "image_queries",
  "MedUnifier.text_hidden": "text_pass",
  "itc_loss": "itc",
  "itm_loss": "itm",
  "lm_logits_from_query_kv": "itg",
  "itg_loss": "itg",
  "VQVAE.__call__": "tig",
  "tig_loss": "tig",
}
_LAYOUT_OPS = {
  "bitcast",
  "broadcast",
  "concatenate",
  "constant",
  "copy",
  "dynamic-slice",
  "dynamic-update-slice",
  "get-tuple-element",
  "pad",
  "parameter",
  "reshape",
  "reverse",
  "slice",
  "transpose",
  "tuple",
}
_RNG_NAMES = ("threefry", "_bernoulli", "_uniform", "random_bits", "rng_bit_generator", "_gamma")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def _section(text: str, name: str) -> list[str]:
  """The lines of one of the HLO text's stack-frame tables (FileNames, StackFrames, ...)."""
  parts = text.split(f"\n{name}\n", 1)
  return parts[1].split("\n\n", 1)[0].splitlines() if len(parts) == 2 else []


def _frame_functions(text: str) -> dict[int, list[str]]:
  """Stack frame id -> the function names of its Python stack, innermost first, up to the
  traced step function."""
  funcs = {
    int(a): b.strip('"') for a, b in (ln.split(None, 1) for ln in _section(text, "FunctionNames"))
  }
  locs = {}
  for ln in _section(text, "FileLocations"):
    m = re.match(r"(\d+) \{file_name_id=\d+ function_name_id=(\d+)", ln)
    locs[int(m[1])] = funcs[int(m[2])]
  frames = {}
  for ln in _section(text, "StackFrames"):
    m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", ln)
    # The text numbers a frame's parent one above the parent's own number (0: none).
    frames[int(m[1])] = (locs[int(m[2])], int(m[3]) - 1)
  out = {}
  for start in frames:
    names, frame = [], start
    while frame in frames and len(names) < 200:
      name, frame = frames[frame]
      names.append(name)
      if name.endswith(".train_step"):
        break
    out[start] = names
  return out


def _part(functions: list[str]) -> str:
  if "compute_losses" not in functions:
    return "update"  # the optimizer, clipping, step bookkeeping
  for name in functions[: functions.index("compute_losses")]:
    for key, part in _PARTS.items():
      if name.endswith(key):
        return part
  return "losses_other"  # compute_losses' own lines: key splits, metrics


def _kind(opcode: str, called: set[str], op_name: str, line: str) -> str:
  if any(r in op_name for r in _RNG_NAMES) or "rng" in opcode:
    return "rng"
  ops = called | {opcode}
  if "dot" in ops or ("custom-call" in ops and "matmul" in line):
    return "matmul"
  if "convolution" in ops:
    return "convolution"
  if opcode in ("while", "conditional", "call"):
    return "control"
  if ops & {"gather", "scatter", "sort"}:
    return "gather_scatter_sort"
  if ops & {"reduce", "reduce-window"}:
    return "reduction"
  if ops <= _LAYOUT_OPS | {"fusion"}:
    return "copy_transpose"
  return "elementwise"


def classify_hlo(text: str) -> dict[str, tuple[str, str, bool]]:
  """Compiled HLO text -> {instruction name: (part, kind, backward)}."""
  frames = _frame_functions(text)
  computations: dict[str, set[str]] = collections.defaultdict(set)
  # A fusion's own op_name is its root's: random bits fused into the mask's compare would
  # read as elementwise, so RNG ops inside a fused computation mark it too.
  random = set()
  instructions = []
  current = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header[1]
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      computations[current].add(m[2])
      instructions.append((m[1], m[2], line))
      if any(r in line for r in _RNG_NAMES):
        random.add(current)
  # Ops XLA made itself (a backward convolution's layout copies, say) have no stack: they take
  # the part of the nearest op they read from, else of the nearest they feed, that has one.
  names = {name for name, _, _ in instructions}
  operands: dict[str, list[str]] = collections.defaultdict(list)
  users: dict[str, list[str]] = collections.defaultdict(list)
  part = {}
  for name, _, line in instructions:
    frame = re.search(r"stack_frame_id=(\d+)", line)
    if frame:
      part[name] = _part(frames.get(int(frame[1]), []))
    args = line.split(" = ", 1)[1].split("metadata=", 1)[0]
    for operand in re.findall(r"%([\w.\-]+)", args):
      if operand in names and operand != name:
        operands[name].append(operand)
        users[operand].append(name)
  out = {}
  for name, opcode, line in instructions:
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    called = computations.get(calls[1], set()) if calls else set()
    op_name = re.search(r'op_name="([^"]*)"', line)
    op_name = op_name[1] if op_name else ""
    found = part.get(name)
    for neighbours in (operands, users):
      seen, frontier = {name}, [name]
      for _ in range(6):
        if found or not frontier:
          break
        frontier = [n for f in frontier for n in neighbours[f] if n not in seen]
        seen.update(frontier)
        found = next((part[n] for n in frontier if n in part), None)
    kind = "rng" if calls and calls[1] in random else _kind(opcode, called, op_name, line)
    out[name] = (found or "unattributed", kind, "transpose(" in op_name)
  return out


def op_self_times(xplane: str) -> dict[str, float]:
  """HLO op name -> summed self time in seconds over the trace's threads (an op's time less
  that of the ops nested in it, e.g. a loop's body)."""
  totals: dict[str, float] = collections.defaultdict(float)
  for plane in jax.profiler.ProfileData.from_file(xplane).planes:
    for line in plane.lines:
      events = []
      for e in line.events:
        op = dict(e.stats).get("hlo_op")
        if op:
          events.append((e.start_ns, e.end_ns, op))
      events.sort(key=lambda x: (x[0], -x[1]))
      stack: list[list] = []  # [end_ns, op, child_ns]

      def close(upto, stack=stack):
        while stack and stack[-1][0] <= upto:
          end, op, child = stack.pop()
          totals[op] -= child * 1e-9

      for start, end, op in events:
        close(start)
        if stack:
          stack[-1][2] += end - start
        totals[op] += (end - start) * 1e-9
        stack.append([end, op, 0])
      close(float("inf"))
  return dict(totals)


def _shares(times: dict[str, float]) -> dict[str, float]:
  total = sum(times.values()) or 1.0
  return {k: round(100 * v / total, 1) for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def profile(config, steps: int, warmup: int, trace_dir: str, top: int = 10) -> dict:
  """Traces `steps` calls of the compiled step and returns the op-time tables (percent)."""
  import time

  from medunifier_jax import pretraining

  compiled, one_step, _ = pretraining.compile_synthetic_step(config)
  for _ in range(warmup):
    one_step()
  with jax.profiler.trace(trace_dir):
    t0 = time.perf_counter()
    for _ in range(steps):
      one_step()
    wall = (time.perf_counter() - t0) / steps
  xplane = max(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  hlo = compiled.as_text()
  Path(trace_dir, "step.hlo.txt").write_text(hlo)  # the op names of the trace, for reading
  ops = classify_hlo(hlo)
  times = op_self_times(str(xplane))
  by_part, by_kind, by_both = (collections.defaultdict(float) for _ in range(3))
  backward = 0.0
  for op, seconds in times.items():
    part, kind, is_backward = ops.get(op, ("unknown", "unknown", False))
    by_part[part] += seconds
    by_kind[kind] += seconds
    by_both[f"{part}/{kind}"] += seconds
    backward += seconds * is_backward
  op_time = sum(times.values()) / steps
  return {
    "step_wall_s": wall,
    "op_time_per_step_s": op_time,
    "backward_pct": round(100 * backward / steps / op_time, 1),
    "by_part_pct": _shares(by_part),
    "by_kind_pct": _shares(by_kind),
    "by_part_and_kind_pct": {k: v for k, v in _shares(by_both).items() if v >= 1.0},
    "top_ops": [
      (op, *ops.get(op, ("unknown", "unknown", False))[:2], round(100 * s / steps / op_time, 1))
      for op, s in sorted(times.items(), key=lambda kv: -kv[1])[:top]
    ],
    "trace": str(xplane),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="step_trace_")
  result = {"config": config.get("variant", ""), "loss_weights": config.loss_weights.to_dict()}
  result.update(profile(config, _STEPS.value, _WARMUP.value, trace_dir, _TOP.value))
  print(json.dumps(result))


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()
  app.run(main)
