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
    "FireFlowScheduler",
    "SettingError",
    "VelocityCall",
    "sample",
]


def __getattr__(name: str):  # FireFlowScheduler on first use: importing diffusers' schedulers costs ~1 s
    if name == "FireFlowScheduler":
        from fireflow.scheduler import FireFlowScheduler

        return FireFlowScheduler
    raise AttributeError(f"module 'fireflow' has no attribute {name!r}")
