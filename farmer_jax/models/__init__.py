"""FARMER model modules: `Farmer`, the flow, the AR prior, mixtures."""
from farmer_jax.models.farmer import Farmer, patchify, unpatchify

__all__ = ["Farmer", "patchify", "unpatchify"]
