"""The four networks of a RepTok pipeline (one concept per file).

``models/`` imports nothing above itself but ``config`` and ``errors``. The generator is one
class, ``TokenGenerator``, whose condition module (labels or text) the config picks.
"""

from ..config import GeneratorConfig
from .generator import TokenGenerator


def build_generator(cfg: GeneratorConfig) -> TokenGenerator:
    """The generator a config asks for (class-conditional, unconditional or text-to-image)."""
    return TokenGenerator(cfg)
