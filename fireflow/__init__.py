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
    "FireFlowScheduler",
    "VelocityCall",
    "sample",
]


def __getattr__(name: str):  # FireFlowScheduler on first use: importing diffusers' schedulers costs ~1 s
    if name == "FireFlowScheduler":
        from fireflow.scheduler import FireFlowScheduler

        return FireFlowScheduler
    raise AttributeError(f"module 'fireflow' has no attribute {name!r}")
