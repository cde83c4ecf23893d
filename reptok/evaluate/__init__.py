"""Evaluation: FID / IS / precision-recall / PSNR / SSIM, feature extractors, image inputs.

Library layer for ``reptok eval``: the CLI checks the Inception weights first
(:func:`find_fid_inception_weights`), opens the sets (:func:`load_images`), extracts features
(:func:`compute_stats`, in the fixed chunks of a :class:`FeatureStream`) and computes the metrics
below; :mod:`reptok.evaluate.probe` is ``reptok eval probe``.
"""

from .inception import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    FeatureExtractor,
    FIDInceptionExtractor,
    FIDInceptionV3,
    InceptionWeightsMissing,
    find_fid_inception_weights,
    load_fid_inception,
    preprocess_for_inception,
)
from .inputs import (
    EvalInputError,
    FeatureStream,
    ImageSet,
    compute_stats,
    images_to_uint8,
    load_images,
    load_reference_stats,
)
from .metrics import (
    IS_RULES,
    PR_DISTANCES,
    adm_squared_distances,
    feature_stats,
    frechet_distance,
    inception_score,
    precision_recall,
    psnr,
    ssim,
    strict_fp32,
)

__all__ = [
    "EvalInputError",
    "FeatureStream",
    "IS_RULES",
    "PR_DISTANCES",
    "adm_squared_distances",
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "FIDInceptionExtractor",
    "FIDInceptionV3",
    "FeatureExtractor",
    "ImageSet",
    "InceptionWeightsMissing",
    "compute_stats",
    "feature_stats",
    "find_fid_inception_weights",
    "frechet_distance",
    "images_to_uint8",
    "inception_score",
    "load_fid_inception",
    "load_images",
    "load_reference_stats",
    "precision_recall",
    "preprocess_for_inception",
    "psnr",
    "ssim",
    "strict_fp32",
]
