"""farmer_jax: FARMER (Flow AutoRegressive Transformer over Pixels) in JAX."""
