"""Models: the architecture registry, the embedded default model, tiny test models, loading."""
from omniquant.models.architectures import ARCHITECTURES, Architecture, architecture_of, decoder_layers
from omniquant.models.loading import checkpoint_dir, ensure_prepared, load_model, model_name, prepare_model

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_of",
    "checkpoint_dir",
    "decoder_layers",
    "ensure_prepared",
    "load_model",
    "model_name",
    "prepare_model",
]
