"""Rules: attention (being written)."""
