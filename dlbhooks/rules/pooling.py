"""Rules: pooling (being written)."""
