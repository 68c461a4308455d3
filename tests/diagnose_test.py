"""`farmer_jax.diagnose`: real/sampled latent halves, decoded."""
import json
import os

import numpy as np
from PIL import Image

from farmer_jax import diagnose

HYBRIDS = ("recon", "real_I+draw_R", "real_I+mean_R", "draw_I+real_R",
           "draw_I+draw_R", "draw_I+draw_R (denoised)")


def test_diagnose_reports_every_hybrid_and_recon_matches_real(
    trained_workdir, tmp_path):
  out = str(tmp_path / "diag")
  result = diagnose.diagnose(trained_workdir, num_images=40, out=out)
  rows = result["hybrids"]
  assert set(rows) == {"real", *HYBRIDS}
  # The exact inverse gives the test images back (to 8 bits), so the
  # classifier labels them as it labels the real ones.
  assert abs(rows["recon"]["accuracy"] - rows["real"]["accuracy"]) <= 1 / 40
  assert rows["recon"]["frechet"] < 1e-2
  # A full sample is further from the real images than their reconstruction.
  assert rows["draw_I+draw_R"]["frechet"] > rows["recon"]["frechet"] + 1.0
  latents = result["latents"]
  assert 0 < latents["background_token_fraction"] < 1
  assert len(latents["zr_std_stroke"]) == len(latents["zr_std_background"])
  with open(os.path.join(out, "diagnosis.json")) as f:
    assert json.load(f)["hybrids"] == rows
  grid = np.asarray(Image.open(os.path.join(out, "diagnosis.png")))
  assert grid.shape[0] == 1 + (1 + len(HYBRIDS)) * (8 + 1)  # 8x8 digits
