"""Evaluation: Math23K accuracy, THUDM's ROUGE/BLEU, answer-token loss."""
