"""Rules: embedding (being written)."""
