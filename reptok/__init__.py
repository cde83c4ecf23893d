"""reptok: single-token latent image generation (RepTok).

The Python API (diffusers style)::

    from reptok import Pipeline
    pipe = Pipeline.from_run("runs/gen", device="cuda", fast=True)
    images = pipe(classes=[88, 88, 207], seed=0, output="pil")   # prompts=[...] for text runs
    tokens = pipe.encode(images)                                  # (B, D)
    again = pipe(tokens=tokens, seed=0, output="np")

``Pipeline`` is imported on first use, so ``import reptok`` stays light (no torch).
"""

__version__ = "0.1.0"

__all__ = ["Pipeline", "InputError", "__version__"]


def __getattr__(name):
    # Lazy: the CLI reads __version__ without paying for torch.
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "InputError":
        from .errors import InputError

        return InputError
    raise AttributeError(f"module 'reptok' has no attribute {name!r}")
