"""The cost of drawing images from reports: FLOPs per image from shapes, images per second."""

import math

from medunifier_jax.prior import cost
from tests.configs_util import load_config


def test_flops_per_image_count_every_prior_pass():
  mu, prior = load_config("tiny"), load_config("tiny", name="prior")
  guided = cost.sampling_flops(mu, prior, steps=12, guided=True)
  plain = cost.sampling_flops(mu, prior, steps=12, guided=False)
  assert all(guided[k] > 0 for k in ("text_encoder", "prior_pass", "decoder"))
  assert guided["per_image"] == (
    guided["text_encoder"] + 24 * guided["prior_pass"] + guided["decoder"]
  )
  assert math.isclose(guided["per_image"] - plain["per_image"], 12 * plain["prior_pass"])
  g = int(mu.model.vqvae.grid)
  assert guided["code_positions"] == (g // 2) ** 2 + g * g
  # Best of 3: every draft costs its passes, its decoding and the judge's ViT + ITM pass.
  best = cost.sampling_flops(mu, prior, steps=12, guided=True, candidates=3)
  assert best["judge"] > 0 and "judge" not in guided
  draft = 24 * best["prior_pass"] + best["decoder"] + best["judge"]
  assert math.isclose(best["per_image"], best["text_encoder"] + 3 * draft)


def test_sampling_speed_reports_images_per_second():
  mu, prior = load_config("tiny"), load_config("tiny", name="prior")
  out = cost.sampling_speed(mu, prior, batch_size=2, steps=2, guidance=1.0, candidates=2, repeats=1)
  assert out["guided"] and out["images_per_s"] > 0 and out["median_s"] > 0
  assert out["candidates"] == 2
