"""What every layer of vqtok shares; it imports nothing from the rest of the package."""

from .image_range import from_signed, to_signed

__all__ = ["from_signed", "to_signed"]
