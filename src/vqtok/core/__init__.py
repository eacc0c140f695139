"""What every layer of vqtok shares: the image-range contract, atomic files, device choice and the few distributed
helpers, and RunDir (a run directory's file names). It imports nothing from the rest of the package."""

from .image_range import from_signed, to_signed

__all__ = ["from_signed", "to_signed"]
