"""Sweep backends: ``local`` (worker processes here) and ``ray`` (a Ray cluster)."""
BACKENDS = ("local", "ray")
