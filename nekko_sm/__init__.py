"""nekko-sm: the per-node storage manager for AI inference nodes."""

__version__ = "0.1.0"
