"""Training library: base-model loading, prompt templates, trainers, embedding file formats, evaluation.

Plain Python on torch/diffusers/transformers; it never imports dagster, so it can be used from a script.
"""
