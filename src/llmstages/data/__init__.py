"""Data: tokenizers, corpora, chat and preference formats, the built-in world."""
