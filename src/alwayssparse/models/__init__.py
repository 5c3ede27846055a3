"""Model definitions used for sparse-training experiments."""

from alwayssparse.models.transformer import TransformerLM, TransformerLMConfig, lm_loss

__all__ = ["TransformerLM", "TransformerLMConfig", "lm_loss"]
