"""The four networks of a RepTok pipeline (one concept per file).

``models/`` imports nothing above itself but ``config`` and ``errors``; ``build_generator`` is the
one place that knows both generator classes.
"""

from ..config import GeneratorConfig
from .generator import TokenGenerator
from .text_generator import TextTokenGenerator


def build_generator(cfg: GeneratorConfig) -> TokenGenerator:
    """The generator class a config asks for: TokenGenerator, or TextTokenGenerator when
    ``cfg.text_encoder`` is set (text-to-image)."""
    return TextTokenGenerator(cfg) if cfg.text_encoder is not None else TokenGenerator(cfg)
