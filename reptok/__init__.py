"""reptok: single-token latent image generation (RepTok)."""

__version__ = "0.1.0"
