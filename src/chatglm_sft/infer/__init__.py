"""Inference: sampling, the generation engine over token ids, chat, batch prediction."""
