"""Rules: recurrent (being written)."""
