"""FireFlow: fast inversion of rectified flow for training-free image editing."""

from fireflow.editor import FireFlowEditor, FireFlowOutput
from fireflow.features import FeatureReuse
from fireflow.settings import EditSettings, SettingError
from fireflow.solvers import VelocityCall, sample

__version__ = "0.1.0"
__all__ = [
    "EditSettings",
    "FeatureReuse",
    "FireFlowEditor",
    "FireFlowOutput",
    "SettingError",
    "VelocityCall",
    "sample",
]
