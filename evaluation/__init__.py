"""Evaluation: the NELBO bound vs the number of diffusion steps, exact AR perplexity, generative quality
under an AR judge, and the whole AR-vs-diffusion study (python -m evaluation.study).

Reads models through inference.loading.load_model and data through training.data; decodes through
inference.api. Nothing in inference/ imports this package.
"""
