"""FARMER model modules: `Farmer`, the flow, the AR prior, mixtures."""
from farmer_jax.models.farmer import Farmer, init_params, patchify, unpatchify

__all__ = ["Farmer", "init_params", "patchify", "unpatchify"]
