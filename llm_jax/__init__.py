"""llm_jax: a JAX trainer for Transformer language models."""

__version__ = '0.1.0'
