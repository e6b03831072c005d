"""The run report: `WORKDIR/report.md` and the same as one self-contained `WORKDIR/report.html`.

Reads what training and evaluation left in the workdir (`metrics.jsonl`, `eval/results.json`,
`eval/outputs/`), measures reconstruction on test phantoms with the trained model, and lays out
the figures table (with the demo's targets), loss curves, reconstructions and code maps,
images drawn from reports (FID/KID and finding fidelity beside their baselines, with N; a grid
of single-finding prompts by samples), the zero-shot confusion matrix, retrieval examples,
generated reports beside the real ones, and VQ code usage. Every figure names its data set and
example count.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from medunifier_jax.report import figures

# (label, entry, data set, metric, target, how the target is read). `baseline_x2` compares
# against twice the model-free baseline's value of the same metric.
TARGETS = (
    ("Zero-shot accuracy, phantom 5x200", "zero_shot", "phantom_5x200", "accuracy", 0.70, "min"),
    ("Retrieval image->text P@1 (paper's definition), phantom 5x200", "retrieval",
     "phantom_5x200", "i2t_P@1", 0.60, "min"),
    ("Retrieval text->image P@1 (paper's definition), phantom 5x200", "retrieval",
     "phantom_5x200", "t2i_P@1", None, "info"),
    ("Fine-tuned, 10% labels: pneumothorax AUC", "finetune", "phantom_pneumothorax", "10%/auc",
     0.95, "min"),
    ("Fine-tuned, 10% labels: COVIDx-like accuracy", "finetune", "phantom_covidx",
     "10%/accuracy", 0.85, "min"),
    ("Fine-tuned, 10% labels: pneumonia AUC", "finetune", "phantom_pneumonia", "10%/auc", None,
     "info"),
    ("Report generation BLEU-4, Open-i phantom test", "report_gen", "phantom_openi", "BLEU-4",
     None, "baseline_x2"),
    ("Report generation CIDEr, Open-i phantom test", "report_gen", "phantom_openi", "CIDEr",
     None, "baseline_x2"),
)


def reconstruction_fn(graphdef: nnx.GraphDef) -> Callable:
  """Jitted `(state, image, input_ids, attention_mask) -> (recon, codes_top, codes_bottom)`:
  `api.reconstruct_fn`, the evaluation-mode TIG pass (running BatchNorm statistics)."""
  from medunifier_jax import api

  return jax.jit(lambda state, *arrays: api.reconstruct_fn(nnx.merge(graphdef, state), *arrays))


def measure_reconstruction(graphdef, state, batches, codebook_size: int) -> dict[str, Any]:
  """PSNR (dB, per image on [0, 1], averaged) and code counts per level over `batches`.

  `batches` yields evaluation batches (`image`, `target_image`, `input_ids`,
  `attention_mask`, `mask`); padded rows are left out. Also keeps the first batch's images,
  reconstructions and code maps for the figure.
  """
  run = reconstruction_fn(graphdef)
  psnrs, counts = [], {"top": np.zeros(codebook_size, np.int64),
                       "bottom": np.zeros(codebook_size, np.int64)}
  first = None
  for batch in batches:
    keep = np.asarray(batch.get("mask", np.ones(len(batch["image"]), bool)), bool)
    recon, top, bottom = jax.device_get(run(state, batch["image"], batch["input_ids"],
                                            batch["attention_mask"]))
    target = np.asarray(batch["target_image"])
    mse = np.mean((recon - target) ** 2, axis=(1, 2, 3))
    psnrs.extend((10.0 * np.log10(1.0 / np.maximum(mse, 1e-12)))[keep].tolist())
    counts["top"] += np.bincount(top[keep].ravel(), minlength=codebook_size)
    counts["bottom"] += np.bincount(bottom[keep].ravel(), minlength=codebook_size)
    if first is None:
      first = dict(target=target[keep], recon=recon[keep], top=top[keep], bottom=bottom[keep])
  return {
      "psnr_db": float(np.mean(psnrs)),
      "num_images": len(psnrs),
      "usage_top": float((counts["top"] > 0).mean()),
      "usage_bottom": float((counts["bottom"] > 0).mean()),
      "counts": counts,
      "examples": first,
  }


def _value(results: dict, entry: str, dataset: str, metric: str) -> float | None:
  v = results.get(entry, {}).get(dataset, {}).get(metric)
  return None if v is None else float(v)


def target_rows(results: dict, recon: dict | None) -> list[dict[str, Any]]:
  """The figures table: label, value, target and whether it is met."""
  rows = []
  for label, entry, dataset, metric, target, kind in TARGETS:
    value = _value(results, entry, dataset, metric)
    row = {"label": label, "value": value, "target": "", "met": None}
    if kind == "min" and value is not None:
      row.update(target=f">= {target:.2f}", met=value >= target)
    elif kind == "baseline_x2":
      base = _value(results, entry, dataset, f"baseline/{metric}")
      if value is not None and base is not None:
        row.update(target=f">= 2 x baseline {base:.4f} = {2 * base:.4f}", met=value >= 2 * base)
    rows.append(row)
  if recon is not None:
    n = recon["num_images"]
    rows.append({"label": f"Reconstruction PSNR (dB), {n} phantom_openi test images",
                 "value": recon["psnr_db"], "target": ">= 24.00",
                 "met": recon["psnr_db"] >= 24.0})
    for level in ("top", "bottom"):
      u = recon[f"usage_{level}"]
      rows.append({"label": f"Codebook usage, {level} level ({n} test images)", "value": u,
                   "target": ">= 0.25", "met": u >= 0.25})
  return rows


def _fmt(v: float | None) -> str:
  return "n/a" if v is None else f"{v:.4f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
  return "\n".join(out)


def write_report(config, workdir: str, graphdef=None, state=None, recon_batches=None,
                 *, timings: dict[str, float] | None = None, max_examples: int = 6) -> str:
  """Writes the figures and `report.md` / `report.html`; returns the markdown path.

  Args:
    config: the run's configuration.
    workdir: the run directory (figures go to WORKDIR/report/).
    graphdef, state: the trained model (for reconstructions); None skips that section.
    recon_batches: evaluation batches of the pre-training test split for reconstructions.
    timings: seconds per stage, shown in the report.
  """
  fig_dir = os.path.join(workdir, "report")
  os.makedirs(fig_dir, exist_ok=True)
  sections: list[str] = [f"# MedUnifier run report: `{config.variant}`\n"]
  payload_path = os.path.join(workdir, "eval", "results.json")
  results = {}
  if os.path.exists(payload_path):
    with open(payload_path) as f:
      results = json.load(f)["results"]

  recon = None
  if graphdef is not None and recon_batches is not None:
    recon = measure_reconstruction(graphdef, state, recon_batches,
                                   int(config.model.vqvae.codebook_size))

  # Figures table.
  rows = target_rows(results, recon)
  table = [[r["label"], _fmt(r["value"]), r["target"] or "-",
            {True: "yes", False: "**no**", None: "-"}[r["met"]]] for r in rows]
  sections.append("## Figures\n\n" + _md_table(["measure", "value", "target", "met"], table))
  if timings:
    sections.append("Time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                       timings.items()))

  # Loss curves.
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    log_rows = figures.read_metrics(metrics_path)
    if log_rows:
      last = log_rows[-1]["step"]
      png = figures.loss_curves(
          log_rows, os.path.join(fig_dir, "losses.png"),
          title=f"Pre-training losses on {config.data.name} (train split), "
                f"{last} steps x {config.batch_size} examples")
      sections.append(f"## Pre-training losses\n\n![losses]({_rel(png, workdir)})")

  # Reconstructions and code maps.
  if recon is not None and recon["examples"] is not None:
    ex = recon["examples"]
    n = min(max_examples, len(ex["target"]))
    png = figures.image_rows(
        [("input", ex["target"][:n]), ("reconstruction", ex["recon"][:n]),
         ("top codes", ex["top"][:n]), ("bottom codes", ex["bottom"][:n])],
        os.path.join(fig_dir, "reconstructions.png"),
        title=f"{config.data.name} test split: {n} phantoms, VQ reconstructions and code maps")
    usage_png = figures.code_usage(
        recon["counts"], os.path.join(fig_dir, "code_usage.png"),
        title=f"VQ code usage on {recon['num_images']} {config.data.name} test images")
    sections.append(
        f"## Reconstructions\n\nMean PSNR {recon['psnr_db']:.2f} dB over "
        f"{recon['num_images']} test images.\n\n![reconstructions]({_rel(png, workdir)})\n\n"
        f"![code usage]({_rel(usage_png, workdir)})")

  outputs = os.path.join(workdir, "eval", "outputs")
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


# image_gen sets in table order, with what each row is.
IMAGE_SETS = (
    ("conditional", "text prior, held-out reports"),
    ("unconditional", "unconditional prior (baseline)"),
    ("null_condition", "text prior, null condition (unconditional baseline)"),
    ("reconstruction", "VQ reconstructions of the real images (upper reference)"),
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
  dataset = re.match(r"image_gen_(.+)\.json", os.path.basename(paths[0])).group(1) \
      if paths else "the test split"
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

    rows.append([f"{label} (`{name}`)", f"{r['fid']:.2f}", kid, fid_n, auc("reports"),
                 auc("prompts")])
  text = [f"## Images from reports: {dataset}\n\n"
          "FID and KID of each set's Inception-v3 pool features (2048-d, images resized to "
          "299 px) against the real test images; N = images in the set vs real images. FID is "
          "biased at small N (two samples of one distribution score above 0) and comparable "
          "only at equal N; KID is unbiased (mean +- spread over random subsets). Fidelity: "
          "AUC, averaged over findings, of a classifier trained on real training images for "
          "the findings each image was asked to show (held-out reports; single-finding "
          "prompts); 0.5 = the text is ignored.\n\n"
          + _md_table(["set", "FID", "KID", "N (set vs real)", "fidelity AUC, held-out reports",
                       "fidelity AUC, prompts"], rows)]
  classifier = by_set.get("fidelity_classifier")
  if classifier:
    text.append(f"The fidelity classifier scores a mean validation AUC of "
                f"{classifier['validation_auc_mean']:.3f} on "
                f"{int(classifier['n_validation'])} real validation images "
                f"({int(classifier['train_steps'])} training steps).")
  sets = extra.get("sets", {})
  if sets:
    text.append("Where each set comes from: " + "; ".join(f"`{k}`: {v}" for k, v in
                                                         sets.items()) + ".")
  findings = extra.get("grid_findings", [])
  names = [n for n, _ in IMAGE_SETS if any(f"prompts_auc/{f}" in by_set.get(n, {})
                                           for f in findings)]
  if findings and names:
    table = [[f] + [_fmt(by_set[n].get(f"prompts_auc/{f}")) for n in names] for f in findings]
    text.append("Fidelity AUC per finding on the single-finding prompts:\n\n"
                + _md_table(["finding"] + [f"`{n}`" for n in names], table))
  arrays = None
  npz = os.path.join(outputs, f"image_gen_{dataset}.npz")
  if os.path.exists(npz):
    arrays = np.load(npz)
  if arrays is not None and "grid_conditional" in arrays.files:
    # Stored as 8-bit gray; as floats in [0, 1] they are drawn as images, not as code maps.
    grid = arrays["grid_conditional"] / 255.0
    real = arrays["grid_real_test"] / 255.0 if "grid_real_test" in arrays.files else None
    rows_img = [(f, np.concatenate([real[i, :1], grid[i]]) if real is not None else grid[i])
                for i, f in enumerate(findings)]
    cols = (["real phantom"] if real is not None else []) + [
        f"sample {j + 1}" for j in range(grid.shape[1])]
    png = figures.image_rows(
        rows_img, os.path.join(fig_dir, "image_gen_prompts.png"),
        title=f"Text prior: {len(findings)} single-finding prompts (rows) x {grid.shape[1]} "
              "samples (columns)", col_titles=cols)
    prompts = extra.get("grid_prompts", [])
    text.append(f"![prompt grid]({_rel(png, workdir)})\n\n"
                + _md_table(["row", "prompt"], [[f, _short(p, 300)] for f, p in
                                                zip(findings, prompts)]))
  if arrays is not None:
    shown = [(label, arrays[f"held_out_{n}"] / 255.0) for n, label in (
        ("real_test", "real"), ("reconstruction", "reconstruction"),
        ("conditional", "text prior"), ("unconditional", "unconditional"),
        ("null_condition", "null condition")) if f"held_out_{n}" in arrays.files]
    if shown:
      png = figures.image_rows(
          shown, os.path.join(fig_dir, "image_gen_held_out.png"),
          title=f"{dataset} test: {len(shown[0][1])} held-out reports",
          col_titles=[f"report {i + 1}" for i in range(len(shown[0][1]))])
      reports = extra.get("held_out_reports", [])
      text.append(f"![held-out reports]({_rel(png, workdir)})\n\n"
                  + _md_table(["column", "report"], [[f"report {i + 1}", _short(r, 300)]
                                                     for i, r in enumerate(reports)]))
  return ["\n\n".join(text)]


def _zero_shot_section(config, outputs: str, fig_dir: str, workdir: str) -> list[str]:
  out = []
  for path in sorted(_glob(outputs, r"zero_shot_(.+)\.npz")):
    dataset = re.match(r"zero_shot_(.+)\.npz", os.path.basename(path)).group(1)
    arrays = np.load(path)
    with open(path[:-4] + ".json") as f:
      names = json.load(f)["class_names"]
    labels, pred = arrays["labels"].astype(int), arrays["probs"].argmax(-1)
    if arrays["probs"].ndim == 1:  # binary sets store P(positive)
      pred = (arrays["probs"] >= 0.5).astype(int)
    matrix = np.zeros((len(names), len(names)), np.int64)
    np.add.at(matrix, (labels, pred), 1)
    png = figures.confusion_matrix(
        matrix, names, os.path.join(fig_dir, f"zero_shot_{dataset}.png"),
        title=f"Zero-shot on {dataset} (test split, {len(labels)} images)")
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
    rows = [f"## Retrieval examples: {dataset} ({split} split, {len(labels)} images x "
            f"{sim.shape[1]} reports)\n\nEach image's top-3 reports; a tick marks a report of "
            "the image's class, the star the image's own report."]
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
    png = figures.image_rows([("query images", images)],
                             os.path.join(fig_dir, f"retrieval_{dataset}.png"),
                             title=f"{dataset}: the query images below",
                             col_titles=[f"image {i}" for i in range(len(images))])
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
    text = (f"## Generated reports: {dataset} (test split, {len(gen)} reports)\n\n"
            + _md_table(rows[0], rows[1:]))
    if "baseline_report" in data:
      text += ("\n\nModel-free baseline (the most frequent training report, returned for every "
               f"image): \"{_short(data['baseline_report'], 300)}\"")
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


def markdown_to_html(md: str, root: str) -> str:
  """The report's small markdown subset -> one HTML page with the PNGs embedded."""
  body, table, para = [], [], []

  def inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

  def flush():
    if table:
      cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table
               if not re.fullmatch(r"\|(---\|)+", r.strip())]
      head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
      rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>"
                     for r in cells[1:])
      body.append(f"<table><tr>{head}</tr>{rows}</table>")
      table.clear()
    if para:
      body.append("<p>" + "<br>".join(inline(p) for p in para) + "</p>")
      para.clear()

  for line in md.splitlines():
    img = re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip())
    if line.startswith("|"):
      if para:
        flush()
      table.append(line)
      continue
    flush()
    if not line.strip():
      continue
    if img:
      with open(os.path.join(root, img.group(2)), "rb") as f:
        data = base64.b64encode(f.read()).decode()
      body.append(f'<img alt="{html.escape(img.group(1))}" src="data:image/png;base64,{data}">')
    elif line.startswith("#"):
      level = len(line) - len(line.lstrip("#"))
      body.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
    else:
      para.append(line)
  flush()
  style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
           "padding:4px 8px;font-size:13px;vertical-align:top}img{max-width:100%}")
  return (f"<!doctype html><html><head><meta charset='utf-8'><title>MedUnifier report</title>"
          f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
