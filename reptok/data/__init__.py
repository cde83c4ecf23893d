"""Data: preparation (image folder, Hugging Face dataset, ``builtin:shapes``) and fast loading.

``prepare(source, out, ...)`` writes a prepared dataset directory; ``PreparedDataset(out)`` reads
it (memory-mapped raw uint8 pixels); ``make_shapes`` generates the builtin dataset in memory.
"""

from .dataset import PreparedDataset, dataset_info, read_meta
from .prep import FORMAT, META_FILE, SKIPPED_FILE, prepare
from ..shapes.render import CLASS_NAMES, COLOURS, NUM_CLASSES, SHAPES, caption_class, class_of, make_shapes, parse_class

__all__ = [
    "prepare", "PreparedDataset", "dataset_info", "read_meta", "FORMAT", "META_FILE", "SKIPPED_FILE",
    "make_shapes", "SHAPES", "COLOURS", "CLASS_NAMES", "NUM_CLASSES", "class_of", "parse_class", "caption_class",
]
