"""FireFlow: fast inversion of rectified flow for training-free image editing."""

from fireflow.editor import EditSettings, FireFlowEditor, FireFlowOutput
from fireflow.features import FeatureReuse, FireFlowAttnProcessor
from fireflow.solvers import VelocityCall, sample

__version__ = "0.1.0"
__all__ = [
    "EditSettings",
    "FeatureReuse",
    "FireFlowAttnProcessor",
    "FireFlowEditor",
    "FireFlowOutput",
    "VelocityCall",
    "sample",
]
