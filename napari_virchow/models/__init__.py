"""Encoders: the registry of specs, weight loading, and the torch encoder (imported lazily: torch is slow)."""
