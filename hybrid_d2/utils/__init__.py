from .io import atomic_output

__all__ = ["atomic_output"]
