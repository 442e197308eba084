"""Attach adapters to a torch model in memory (unmerged, swappable) and detach them again."""
