"""Profiles: look inside a model (attention spikes, adjacent-layer similarity, head policies)."""
