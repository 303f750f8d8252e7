"""Measuring a model against text or against another model: perplexity and KL divergence."""
