"""protofed: a simulator for federated class-incremental learning with prototypes."""

__version__ = "0.1.0"
