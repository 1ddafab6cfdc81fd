"""Integrations with other libraries (accelerate offloading and device maps)."""
