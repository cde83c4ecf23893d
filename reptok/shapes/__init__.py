"""The built-in shapes world: everything reptok needs to run offline on a CPU.

``render`` draws ``builtin:shapes`` (12 classes: 4 shapes x 3 colours), ``ssl`` pre-trains the
CPU presets' ViT on it (the offline stand-in for DINOv2, ``builtin:shapes-ssl``), ``judge`` is the
small classifier that scores samples, ``quickstart`` runs the whole method with a report.
Nothing here is imported by the core at import time (only ``data.prep`` reads ``render`` for the
``builtin:shapes`` source, ``Pipeline.build`` resolves ``builtin:*`` encoder weights through ``ssl``).
"""
