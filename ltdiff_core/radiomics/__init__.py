"""Radiomic reproducibility evaluation: ROIs, features (PyRadiomics + GOH + IH), CCC/RE, report."""
from .classes import ALL_CLASSES, EXTRA_CLASSES, PAPER_CLASSES, feature_class
from .metrics import ccc, feature_agreement, groupwise_ccc, relative_error

__all__ = ["ALL_CLASSES", "EXTRA_CLASSES", "PAPER_CLASSES", "ccc", "feature_agreement", "feature_class",
           "groupwise_ccc", "relative_error"]
