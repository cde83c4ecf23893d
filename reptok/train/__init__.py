"""Training: one loop (``loop.fit``) used by stage (a) ``recon`` and stage (b) ``gen``."""
