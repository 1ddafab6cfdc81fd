"""Rules: norm (being written)."""
