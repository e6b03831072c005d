"""The PyTorch peer for the benchmark: BLIP-2 ITC + ITM with transformers' modules.

The same work as our ITC+ITM step at the config's sizes: a frozen `Blip2VisionModel`, the
`Blip2QFormerModel` in image, text and matching modes with `Blip2TextEmbeddings`, projections,
the ITM head and a learned temperature; ITC with label smoothing over the batch, ITM with one
hard negative image per text and one hard negative text per image drawn from the ITC softmax
(as in LAVIS' BLIP-2); dropout 0.1; AdamW with the config's values. Requires `torch` (the test
extra).
"""

import time

import numpy as np


def _sizes(width: int, depth: int, heads: int, mlp: int, eps: float) -> dict:
  """The transformer sizes, named as both transformers configs name them."""
  return dict(
    hidden_size=width,
    num_hidden_layers=depth,
    num_attention_heads=heads,
    intermediate_size=mlp,
    layer_norm_eps=eps,
  )


def _blip2_config(config):
  from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

  vit, qf = config.model.vit, config.model.qformer
  vision = Blip2VisionConfig(
    **_sizes(vit.width, vit.depth, vit.num_heads, vit.mlp_dim, vit.layer_norm_eps),
    image_size=vit.image_size,
    patch_size=vit.patch_size,
    qkv_bias=vit.qkv_bias,
    attention_dropout=vit.dropout,
  )
  # The padded vocabulary (qformer.vocab_size, not dec_token_id + 1): the same embedding table
  # as ours, so that the two steps do the same work.
  qformer = Blip2QFormerConfig(
    **_sizes(qf.hidden_size, qf.num_layers, qf.num_heads, qf.intermediate_size, qf.layer_norm_eps),
    vocab_size=qf.vocab_size,
    hidden_dropout_prob=qf.hidden_dropout,
    attention_probs_dropout_prob=qf.attention_dropout,
    max_position_embeddings=qf.max_position_embeddings,
    cross_attention_frequency=qf.cross_attention_freq,
    encoder_hidden_size=vit.width,
    pad_token_id=qf.pad_token_id,
    use_qformer_text_input=True,  # text and matching modes, as in Blip2ForImageTextRetrieval
  )
  return Blip2Config(
    vision_config=vision.to_dict(),
    qformer_config=qformer.to_dict(),
    num_query_tokens=qf.num_queries,
    image_text_hidden_size=config.model.embed_dim,
  )


def make_peer(config):
  """`(model, optimizer, step_fn)`; `step_fn(batch)` runs one ITC+ITM training step."""
  import torch
  import torch.nn.functional as F
  from transformers import Blip2ForImageTextRetrieval

  torch.manual_seed(int(config.seed))
  model = Blip2ForImageTextRetrieval(_blip2_config(config)).float()
  if config.model.vit.frozen:
    model.vision_model.requires_grad_(False)
  temp = torch.nn.Parameter(torch.tensor(float(config.model.temperature_init)))
  trainable = [p for p in model.parameters() if p.requires_grad] + [temp]
  optimizer = torch.optim.AdamW(
    trainable,
    lr=float(config.learning_rate),
    betas=(config.adam_b1, config.adam_b2),
    weight_decay=float(config.weight_decay),
  )
  smoothing = float(config.label_smoothing)
  t_min, t_max = float(config.model.temperature_min), float(config.model.temperature_max)

  def step(batch):
    model.train()
    pixels, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0]
    with torch.set_grad_enabled(not config.model.vit.frozen):
      image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    queries = model.query_tokens.expand(b, -1, -1)
    q_out = model.qformer(
      query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask
    ).last_hidden_state
    image_feats = F.normalize(model.vision_projection(q_out), dim=-1)  # (B, Q, E)
    t_out = model.qformer(
      query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask
    ).last_hidden_state
    text_feat = F.normalize(model.text_projection(t_out[:, 0]), dim=-1)  # (B, E)
    t = temp.clamp(t_min, t_max)
    sim_i2t = torch.einsum("bqe,te->btq", image_feats, text_feat).max(-1).values / t
    sim_t2i = sim_i2t.t()
    targets = torch.arange(b)
    loss_itc = (
      F.cross_entropy(sim_i2t, targets, label_smoothing=smoothing)
      + F.cross_entropy(sim_t2i, targets, label_smoothing=smoothing)
    ) / 2
    with torch.no_grad():
      eye = torch.eye(b, dtype=torch.bool)
      w_t2i = F.softmax(sim_t2i, dim=1).masked_fill(eye, 0) + 1e-12
      w_i2t = F.softmax(sim_i2t, dim=1).masked_fill(eye, 0) + 1e-12
      neg_image = torch.multinomial(w_t2i, 1).squeeze(1)
      neg_text = torch.multinomial(w_i2t, 1).squeeze(1)
    all_ids = torch.cat([ids, ids, ids[neg_text]])
    all_mask = torch.cat([mask, mask, mask[neg_text]])
    all_images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
    q3 = model.query_tokens.expand(3 * b, -1, -1)
    joint_mask = torch.cat([torch.ones(q3.shape[:-1], dtype=torch.long), all_mask], dim=1)
    itm_out = model.qformer(
      query_embeds=model.embeddings(input_ids=all_ids, query_embeds=q3),
      query_length=q3.shape[1],
      attention_mask=joint_mask,
      encoder_hidden_states=all_images,
      encoder_attention_mask=torch.ones(all_images.shape[:-1], dtype=torch.long),
    ).last_hidden_state
    logits = model.itm_head(itm_out[:, : q3.shape[1]]).mean(1)
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
    loss_itm = F.cross_entropy(logits, labels)
    loss = loss_itc + loss_itm
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, float(config.grad_clip_norm))
    optimizer.step()
    return float(loss.detach())

  return model, optimizer, step


def benchmark_pytorch(config, steps: int, warmup: int, *, threads: int = 2) -> dict:
  """Median seconds per ITC+ITM step of the PyTorch peer on a synthetic batch."""
  import torch

  from medunifier_jax.pretraining import random_batch

  torch.set_num_threads(threads)
  _, _, step = make_peer(config)
  host = random_batch(config)
  batch = {
    # transformers' vision model is NCHW.
    "image": torch.from_numpy(np.ascontiguousarray(host["image"].transpose(0, 3, 1, 2))),
    "input_ids": torch.from_numpy(host["input_ids"]).long(),
    "attention_mask": torch.from_numpy(host["attention_mask"]).long(),
  }
  for _ in range(warmup):
    step(batch)
  times, losses = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    losses.append(step(batch))
    times.append(time.perf_counter() - t0)
  return {
    "median_step_s": float(np.median(times)),
    "examples_per_s": int(config.batch_size) / float(np.median(times)),
    "step_times_s": times,
    "threads": threads,
    "final_loss": losses[-1],
  }
