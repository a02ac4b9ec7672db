"""emdask: connectome reconstruction from serial-section EM volumes on Dask.

The pipeline, in the order data flows: volumes -> (alignment, defects) -> boundary
detection -> segmentation -> synapses -> evaluation.  Every stage takes and returns lazy
volumes (:class:`xarray.DataArray` over Dask arrays with nm coordinates).
"""

from emdask.affinities import affinities_from_labels, mask_affinities
from emdask.align import align, render
from emdask.defects import detect_defects
from emdask.errors import (
    correct_merges,
    correct_splits,
    detect_merges,
    detect_splits,
    error_table,
)
from emdask.metrics import adapted_rand, contingency_table, evaluate, voi
from emdask.pipeline import run
from emdask.pyramids import downsample
from emdask.segmentation import segment
from emdask.synapses import (
    assign_partners,
    connectivity_matrix,
    connectome,
    find_synapses,
    partner_accuracy,
    synapse_scores,
)
from emdask.volumes import VolumeError, cutout, open_volume, save_volume

__version__ = "0.3.0"

# The nets' functions are imported when first used: ``import emdask`` does not load torch
# (a second of start-up and ~300 MB, wasted on workers that only segment or score).
_LAZY = {"predict_affinities": "emdask.predict", "predict_synapses": "emdask.predict",
         "train": "emdask.training"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emdask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "VolumeError",
    "adapted_rand",
    "affinities_from_labels",
    "align",
    "assign_partners",
    "connectivity_matrix",
    "connectome",
    "contingency_table",
    "correct_merges",
    "correct_splits",
    "cutout",
    "detect_defects",
    "detect_merges",
    "detect_splits",
    "downsample",
    "error_table",
    "evaluate",
    "find_synapses",
    "mask_affinities",
    "open_volume",
    "partner_accuracy",
    "predict_affinities",
    "predict_synapses",
    "render",
    "run",
    "save_volume",
    "segment",
    "synapse_scores",
    "train",
    "voi",
]
