"""Model loading: HF directories and GGUF files become one LoadedModel (config, HF-named weights, tokenizer)."""

from fuselm.loader.types import LoadedModel
from fuselm.loader.load import load_model

__all__ = ["LoadedModel", "load_model"]
