"""The run report: `WORKDIR/report.md` and the same as one self-contained `WORKDIR/report.html`.

Reads only what training and evaluation left in the workdir (`metrics.jsonl`,
`eval/results.json`, `eval/outputs/`) and never runs the model: every figure comes from
`python -m medunifier_jax.evaluate`, the demo's evaluation stages or periodic evaluation during
training. It lays out the figures table (with the demo's targets), loss curves, VQ
reconstructions, code maps and code usage (the `reconstruction` evaluator's), images drawn from
reports (FID/KID and finding fidelity beside their baselines, with N; a grid of single-finding
prompts by samples), the zero-shot confusion matrix, retrieval examples and generated reports
beside the real ones. Every figure names its data set and example count.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

import numpy as np

from medunifier_jax.evaluators import metrics
from medunifier_jax.report import figures

# (label, entry, data set, metric, target, how the target is read). `baseline_x2` compares
# against twice the model-free baseline's value of the same metric.
TARGETS = (
  ("Zero-shot accuracy, phantom 5x200", "zero_shot", "phantom_5x200", "accuracy", 0.70, "min"),
  (
    "Retrieval image->text P@1 (paper's definition), phantom 5x200",
    "retrieval",
    "phantom_5x200",
    "i2t_P@1",
    0.60,
    "min",
  ),
  (
    "Retrieval text->image P@1 (paper's definition), phantom 5x200",
    "retrieval",
    "phantom_5x200",
    "t2i_P@1",
    None,
    "info",
  ),
  (
    "Fine-tuned, 10% labels: pneumothorax AUC",
    "finetune",
    "phantom_pneumothorax",
    "10%/auc",
    0.95,
    "min",
  ),
  (
    "Fine-tuned, 10% labels: COVIDx-like accuracy",
    "finetune",
    "phantom_covidx",
    "10%/accuracy",
    0.85,
    "min",
  ),
  (
    "Fine-tuned, 10% labels: pneumonia AUC",
    "finetune",
    "phantom_pneumonia",
    "10%/auc",
    None,
    "info",
  ),
  (
    "Report generation BLEU-4, Open-i phantom test",
    "report_gen",
    "phantom_openi",
    "BLEU-4",
    None,
    "baseline_x2",
  ),
  (
    "Report generation CIDEr, Open-i phantom test",
    "report_gen",
    "phantom_openi",
    "CIDEr",
    None,
    "baseline_x2",
  ),
  (
    "Reconstruction PSNR (dB), phantom_openi test",
    "reconstruction",
    "phantom_openi",
    "psnr_db",
    24.0,
    "min",
  ),
  (
    "Codebook usage, top level, phantom_openi test",
    "reconstruction",
    "phantom_openi",
    "usage_top",
    0.25,
    "min",
  ),
  (
    "Codebook usage, bottom level, phantom_openi test",
    "reconstruction",
    "phantom_openi",
    "usage_bottom",
    0.25,
    "min",
  ),
)


def _value(results: dict, entry: str, dataset: str, metric: str) -> float | None:
  v = results.get(entry, {}).get(dataset, {}).get(metric)
  return None if v is None else float(v)


def target_rows(results: dict) -> list[dict[str, Any]]:
  """The figures table: label, value, target and whether it is met. Entries that count their
  examples (`num_images`) have the count added to the label."""
  rows = []
  for label, entry, dataset, metric, target, kind in TARGETS:
    value = _value(results, entry, dataset, metric)
    n = _value(results, entry, dataset, "num_images")
    if n is not None:
      label = f"{label} ({int(n)} images)"
    row = {"label": label, "value": value, "target": "", "met": None}
    if kind == "min" and value is not None:
      row.update(target=f">= {target:.2f}", met=value >= target)
    elif kind == "baseline_x2":
      base = _value(results, entry, dataset, f"baseline/{metric}")
      if value is not None and base is not None:
        row.update(target=f">= 2 x baseline {base:.4f} = {2 * base:.4f}", met=value >= 2 * base)
    rows.append(row)
  return rows


def _fmt(v: float | None) -> str:
  return "n/a" if v is None else f"{v:.4f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
  return "\n".join(out)


def read_payload(workdir: str) -> dict[str, Any]:
  """WORKDIR/eval/results.json (`results`, `protocol`, `meta`); empty parts when absent."""
  payload = {"results": {}, "protocol": {}, "meta": {}}
  path = os.path.join(workdir, "eval", "results.json")
  if os.path.exists(path):
    with open(path) as f:
      payload.update(json.load(f))
  return payload


def task_entries(payload: dict, task: str) -> list[str]:
  """The evaluated entries that ran `task` (an entry's task defaults to its name)."""
  protocol = payload.get("protocol", {})
  return [
    name for name in payload.get("results", {}) if protocol.get(name, {}).get("task", name) == task
  ]


def write_report(
  config, workdir: str, *, timings: dict[str, float] | None = None, max_examples: int = 6
) -> str:
  """Writes the figures and `report.md` / `report.html` from the workdir's files; returns the
  markdown path.

  Args:
    config: the run's configuration.
    workdir: the run directory (figures go to WORKDIR/report/).
    timings: seconds per stage, shown in the report.
    max_examples: examples shown per figure or table at most.
  """
  fig_dir = os.path.join(workdir, "report")
  os.makedirs(fig_dir, exist_ok=True)
  sections: list[str] = [f"# MedUnifier run report: `{config.variant}`\n"]
  payload = read_payload(workdir)
  results = payload["results"]

  # Figures table.
  rows = target_rows(results)
  table = [
    [
      r["label"],
      _fmt(r["value"]),
      r["target"] or "-",
      {True: "yes", False: "**no**", None: "-"}[r["met"]],
    ]
    for r in rows
  ]
  sections.append("## Figures\n\n" + _md_table(["measure", "value", "target", "met"], table))
  if timings:
    sections.append("Time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

  # Loss curves.
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    log_rows = figures.read_metrics(metrics_path)
    if log_rows:
      last = log_rows[-1]["step"]
      png = figures.loss_curves(
        log_rows,
        os.path.join(fig_dir, "losses.png"),
        title=f"Pre-training losses on {config.data.name} (train split), "
        f"{last} steps x {config.batch_size} examples",
      )
      sections.append(f"## Pre-training losses\n\n![losses]({_rel(png, workdir)})")

  outputs = os.path.join(workdir, "eval", "outputs")
  sections += _reconstruction_section(payload, outputs, fig_dir, workdir, max_examples)
  sections += _image_gen_section(results, outputs, fig_dir, workdir)
  sections += _zero_shot_section(config, outputs, fig_dir, workdir)
  sections += _retrieval_section(config, outputs, fig_dir, workdir, max_examples)
  sections += _report_gen_section(outputs, max_examples)
  if results:
    sections.append("## All evaluation results\n\n" + _all_results(results))

  md = "\n\n".join(sections) + "\n"
  md_path = os.path.join(workdir, "report.md")
  with open(md_path, "w") as f:
    f.write(md)
  with open(os.path.join(workdir, "report.html"), "w") as f:
    f.write(markdown_to_html(md, workdir))
  return md_path


def _reconstruction_section(
  payload: dict, outputs: str, fig_dir: str, workdir: str, max_examples: int
) -> list[str]:
  """Per reconstruction entry and data set: PSNR and code usage, then (when the evaluation
  saved its outputs; periodic evaluation during training does not) the example inputs,
  reconstructions and code maps, and each level's code histogram."""
  out = []
  for entry in task_entries(payload, "reconstruction"):
    split = payload["protocol"].get(entry, {}).get("split", "test")
    for dataset, scores in payload["results"][entry].items():
      where = f"{dataset} {split} split"
      text = [
        f"## Reconstructions: {where}\n\n"
        f"Mean PSNR {scores['psnr_db']:.2f} dB over {int(scores['num_images'])} images; "
        f"codebook usage {scores['usage_top']:.3f} (top), {scores['usage_bottom']:.3f} "
        f"(bottom); code perplexity {scores['perplexity_top']:.1f} (top), "
        f"{scores['perplexity_bottom']:.1f} (bottom)."
      ]
      npz = os.path.join(outputs, f"{entry}_{dataset}.npz")
      if os.path.exists(npz):
        text += _reconstruction_figures(
          np.load(npz),
          f"{entry}_{dataset}",
          where,
          int(scores["num_images"]),
          fig_dir,
          workdir,
          max_examples,
        )
      out.append("\n\n".join(text))
  return out


def _reconstruction_figures(
  arrays, stem: str, where: str, n_images: int, fig_dir: str, workdir: str, max_examples: int
) -> list[str]:
  """Markdown images of a reconstruction output file: `inputs` / `recons` (n, S, S, 3) uint8
  with `codes_top` / `codes_bottom` maps, and the histograms of `counts_top` / `counts_bottom`
  (K,)."""
  out = []
  if "inputs" in arrays.files:
    n = min(max_examples, len(arrays["inputs"]))
    # Stored as 8-bit; as floats in [0, 1] they are drawn as images, not as code maps.
    png = figures.image_rows(
      [
        ("input", arrays["inputs"][:n] / 255.0),
        ("reconstruction", arrays["recons"][:n] / 255.0),
        ("top codes", arrays["codes_top"][:n]),
        ("bottom codes", arrays["codes_bottom"][:n]),
      ],
      os.path.join(fig_dir, f"{stem}.png"),
      title=f"{where}: {n} images, VQ reconstructions and code maps",
    )
    out.append(f"![reconstructions]({_rel(png, workdir)})")
  counts = {
    level: arrays[f"counts_{level}"]
    for level in ("top", "bottom")
    if f"counts_{level}" in arrays.files
  }
  if counts:
    png = figures.code_usage(
      counts,
      os.path.join(fig_dir, f"{stem}_codes.png"),
      title=f"VQ code usage on {n_images} images of the {where}",
    )
    out.append(f"![code usage]({_rel(png, workdir)})")
  return out


# image_gen sets in table order, with what each row is.
IMAGE_SETS = (
  ("conditional", "text prior, held-out reports"),
  ("unconditional", "unconditional prior (baseline)"),
  ("null_condition", "text prior, null condition (unconditional baseline)"),
  ("reconstruction", "VQ reconstructions of the real images (upper reference)"),
  ("code_grid_mean", "real images averaged over the bottom code grid's cells (yardstick)"),
  ("real_train", "real training images (data floor)"),
  ("real_test", "real test images against themselves (sanity: 0)"),
)


def _image_gen_section(results: dict, outputs: str, fig_dir: str, workdir: str) -> list[str]:
  """FID/KID and fidelity per set with N, the prompt grid and held-out examples."""
  by_set = results.get("image_gen")
  if not by_set:
    return []
  paths = _glob(outputs, r"image_gen_(.+)\.json")
  extra = {}
  if paths:
    with open(paths[0]) as f:
      extra = json.load(f)
  dataset = (
    re.match(r"image_gen_(.+)\.json", os.path.basename(paths[0])).group(1)
    if paths
    else "the test split"
  )
  rows = []
  for name, label in IMAGE_SETS:
    r = by_set.get(name)
    if r is None:
      continue
    kid = f"{r['kid_mean']:.4f} +- {r['kid_std']:.4f}"
    fid_n = f"{int(r['n_generated'])} vs {int(r['n_real'])}"

    def auc(prefix, r=r):
      if f"{prefix}_auc_mean" not in r:
        return "-"
      return f"{r[f'{prefix}_auc_mean']:.3f} (n={int(r[f'n_{prefix}'])})"

    rows.append(
      [f"{label} (`{name}`)", f"{r['fid']:.2f}", kid, fid_n, auc("reports"), auc("prompts")]
    )
  text = [
    f"## Images from reports: {dataset}\n\n"
    "FID and KID of each set's Inception-v3 pool features (2048-d, images resized to "
    "299 px) against the real test images; N = images in the set vs real images. FID is "
    "biased at small N (two samples of one distribution score above 0) and comparable "
    "only at equal N; KID is unbiased (mean +- spread over random subsets). Fidelity: "
    "AUC, averaged over findings, of a classifier trained on real training images for "
    "the findings each image was asked to show (held-out reports; single-finding "
    "prompts); 0.5 = the text is ignored.\n\n"
    + _md_table(
      [
        "set",
        "FID",
        "KID",
        "N (set vs real)",
        "fidelity AUC, held-out reports",
        "fidelity AUC, prompts",
      ],
      rows,
    )
  ]
  classifier = by_set.get("fidelity_classifier")
  if classifier:
    text.append(
      f"The fidelity classifier scores a mean validation AUC of "
      f"{classifier['validation_auc_mean']:.3f} on "
      f"{int(classifier['n_validation'])} real validation images "
      f"({int(classifier['train_steps'])} training steps)."
    )
  sets = extra.get("sets", {})
  if sets:
    text.append(
      "Where each set comes from: " + "; ".join(f"`{k}`: {v}" for k, v in sets.items()) + "."
    )
  findings = extra.get("grid_findings", [])
  names = [
    n for n, _ in IMAGE_SETS if any(f"prompts_auc/{f}" in by_set.get(n, {}) for f in findings)
  ]
  if findings and names:
    table = [[f] + [_fmt(by_set[n].get(f"prompts_auc/{f}")) for n in names] for f in findings]
    text.append(
      "Fidelity AUC per finding on the single-finding prompts:\n\n"
      + _md_table(["finding"] + [f"`{n}`" for n in names], table)
    )
  arrays = None
  npz = os.path.join(outputs, f"image_gen_{dataset}.npz")
  if os.path.exists(npz):
    arrays = np.load(npz)
  if arrays is not None and "grid_conditional" in arrays.files:
    # Stored as 8-bit gray; as floats in [0, 1] they are drawn as images, not as code maps.
    grid = arrays["grid_conditional"] / 255.0
    real = arrays["grid_real_test"] / 255.0 if "grid_real_test" in arrays.files else None
    rows_img = [
      (f, np.concatenate([real[i, :1], grid[i]]) if real is not None else grid[i])
      for i, f in enumerate(findings)
    ]
    cols = (["real phantom"] if real is not None else []) + [
      f"sample {j + 1}" for j in range(grid.shape[1])
    ]
    png = figures.image_rows(
      rows_img,
      os.path.join(fig_dir, "image_gen_prompts.png"),
      title=f"Text prior: {len(findings)} single-finding prompts (rows) x {grid.shape[1]} "
      "samples (columns)",
      col_titles=cols,
    )
    prompts = extra.get("grid_prompts", [])
    text.append(
      f"![prompt grid]({_rel(png, workdir)})\n\n"
      + _md_table(["row", "prompt"], [[f, _short(p, 300)] for f, p in zip(findings, prompts)])
    )
  if arrays is not None:
    shown = [
      (label, arrays[f"held_out_{n}"] / 255.0)
      for n, label in (
        ("real_test", "real"),
        ("reconstruction", "reconstruction"),
        ("conditional", "text prior"),
        ("unconditional", "unconditional"),
        ("null_condition", "null condition"),
      )
      if f"held_out_{n}" in arrays.files
    ]
    if shown:
      png = figures.image_rows(
        shown,
        os.path.join(fig_dir, "image_gen_held_out.png"),
        title=f"{dataset} test: {len(shown[0][1])} held-out reports",
        col_titles=[f"report {i + 1}" for i in range(len(shown[0][1]))],
      )
      reports = extra.get("held_out_reports", [])
      text.append(
        f"![held-out reports]({_rel(png, workdir)})\n\n"
        + _md_table(
          ["column", "report"], [[f"report {i + 1}", _short(r, 300)] for i, r in enumerate(reports)]
        )
      )
  return ["\n\n".join(text)]


def _zero_shot_section(config, outputs: str, fig_dir: str, workdir: str) -> list[str]:
  out = []
  for path in sorted(_glob(outputs, r"zero_shot_(.+)\.npz")):
    dataset = re.match(r"zero_shot_(.+)\.npz", os.path.basename(path)).group(1)
    arrays = np.load(path)
    with open(path[:-4] + ".json") as f:
      names = json.load(f)["class_names"]
    labels, probs = arrays["labels"].astype(int), arrays["probs"]
    if probs.ndim == 1:  # binary sets store P(positive)
      probs = np.stack([1.0 - probs, probs], axis=-1)
    matrix = metrics.confusion_matrix(labels, probs)
    png = figures.confusion_matrix(
      matrix,
      names,
      os.path.join(fig_dir, f"zero_shot_{dataset}.png"),
      title=f"Zero-shot on {dataset} (test split, {len(labels)} images)",
    )
    out.append(f"## Zero-shot classification: {dataset}\n\n![confusion]({_rel(png, workdir)})")
  return out


def _retrieval_section(config, outputs, fig_dir, workdir, max_examples) -> list[str]:
  from medunifier_jax.data import registry

  out = []
  for path in sorted(_glob(outputs, r"retrieval_(.+)\.npz")):
    dataset = re.match(r"retrieval_(.+)\.npz", os.path.basename(path)).group(1)
    arrays = np.load(path)
    sim, labels, index = arrays["similarity"], arrays["labels"], arrays["index"]
    split = config.evals.retrieval.get("split", "test")
    source = registry.get_source(dataset, split, config.data)
    names = getattr(source, "class_names", None)
    rows = [
      f"## Retrieval examples: {dataset} ({split} split, {len(labels)} images x "
      f"{sim.shape[1]} reports)\n\nEach image's top-3 reports; a tick marks a report of "
      "the image's class, the star the image's own report."
    ]
    images = []
    for i in range(min(max_examples, len(labels))):
      rec = source[int(index[i])]
      images.append(np.asarray(rec["image"], np.float32) / 255.0)
      cls = names[int(labels[i])] if names is not None else str(int(labels[i]))
      lines = [f"**image {i}** (class {cls}):"]
      for rank, j in enumerate(np.argsort(-sim[i])[:3], 1):
        mark = ("\u2605 " if j == i else "") + ("\u2713" if labels[j] == labels[i] else "\u2717")
        text = source[int(index[j])]["report"]
        lines.append(f"{rank}. {mark} {_short(text)}")
      rows.append("\n".join(lines))
    png = figures.image_rows(
      [("query images", images)],
      os.path.join(fig_dir, f"retrieval_{dataset}.png"),
      title=f"{dataset}: the query images below",
      col_titles=[f"image {i}" for i in range(len(images))],
    )
    rows.insert(1, f"![queries]({_rel(png, workdir)})")
    out.append("\n\n".join(rows))
  return out


def _report_gen_section(outputs: str, max_examples: int) -> list[str]:
  out = []
  for path in sorted(_glob(outputs, r"report_gen_(.+)\.json")):
    dataset = re.match(r"report_gen_(.+)\.json", os.path.basename(path)).group(1)
    with open(path) as f:
      data = json.load(f)
    gen, refs = data["generated"], data["references"]
    rows = [["generated", "reference"]]
    for g, r in list(zip(gen, refs))[:max_examples]:
      r = " ".join(r) if isinstance(r, list) else r
      rows.append([_short(g, 300), _short(r, 300)])
    text = f"## Generated reports: {dataset} (test split, {len(gen)} reports)\n\n" + _md_table(
      rows[0], rows[1:]
    )
    if "baseline_report" in data:
      text += (
        "\n\nModel-free baseline (the most frequent training report, returned for every "
        f'image): "{_short(data["baseline_report"], 300)}"'
      )
    out.append(text)
  return out


def _all_results(results: dict) -> str:
  rows = []
  for entry, by_set in results.items():
    for dataset, by_metric in by_set.items():
      for metric, value in by_metric.items():
        rows.append([entry, dataset, metric, _fmt(value)])
  return _md_table(["evaluation", "data set", "metric", "value"], rows)


def _short(text: str, n: int = 160) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= n else text[: n - 3] + "..."


def _glob(folder: str, pattern: str) -> list[str]:
  if not os.path.isdir(folder):
    return []
  return [os.path.join(folder, f) for f in os.listdir(folder) if re.fullmatch(pattern, f)]


def _rel(path: str, root: str) -> str:
  return os.path.relpath(path, root)


STYLE = (
  "body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
  "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
  "padding:4px 8px;font-size:13px;vertical-align:top}img{max-width:100%}"
)


def markdown_to_html(md: str, root: str) -> str:
  """The report's markdown -> one HTML page with the PNGs embedded as data URIs (the page
  stands alone: it can be mailed or opened away from the workdir).

  CommonMark with tables; raw HTML is escaped (generated reports are quoted verbatim) and line
  breaks inside a paragraph are kept (retrieval examples list one report per line).
  """
  from markdown_it import MarkdownIt

  parser = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")
  tokens = parser.parse(md)
  for token in tokens:
    for child in token.children or ():
      if child.type == "image":
        child.attrSet("src", _data_uri(str(child.attrGet("src")), root))
  body = parser.renderer.render(tokens, parser.options, {})
  return (
    f"<!doctype html><html><head><meta charset='utf-8'><title>MedUnifier report</title>"
    f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
  )


def _data_uri(src: str, root: str) -> str:
  """A PNG path relative to `root` -> a base64 data URI; anything else (a URL, a missing file)
  is left as it is."""
  path = os.path.join(root, src)
  if re.match(r"[a-z][a-z0-9+.-]*:", src) or not os.path.isfile(path):
    return src
  with open(path, "rb") as f:
    return "data:image/png;base64," + base64.b64encode(f.read()).decode()
