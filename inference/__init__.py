"""Decoding: batched parallel-decode diffusion sampling, AR sampling with a KV cache, model loading.

    from inference import load_model, generate, generate_with_stats
"""
from inference.api import Completion, DecodeOptions, StepInfo, generate, generate_with_stats
from inference.loading import LoadedModel, load_model

__all__ = ["Completion", "DecodeOptions", "StepInfo", "generate", "generate_with_stats", "LoadedModel", "load_model"]
