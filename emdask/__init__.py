"""emdask: connectome reconstruction from serial-section EM volumes on Dask.

The pipeline, in the order data flows: volumes -> (alignment, defects) -> boundary
detection -> segmentation -> synapses -> evaluation.  Every stage takes and returns lazy
volumes (:class:`xarray.DataArray` over Dask arrays with nm coordinates).
"""

from emdask.affinities import affinities_from_labels, mask_affinities
from emdask.align import align, render
from emdask.defects import detect_defects
from emdask.metrics import adapted_rand, contingency_table, evaluate, voi
from emdask.pipeline import run
from emdask.predict import predict_affinities, predict_synapses
from emdask.segmentation import segment
from emdask.synapses import (
    assign_partners,
    connectivity_matrix,
    connectome,
    find_synapses,
    partner_accuracy,
    synapse_scores,
)
from emdask.training import train
from emdask.volumes import VolumeError, cutout, open_volume, save_volume

__version__ = "0.1.0"

__all__ = [
    "VolumeError",
    "adapted_rand",
    "affinities_from_labels",
    "align",
    "assign_partners",
    "connectivity_matrix",
    "connectome",
    "contingency_table",
    "cutout",
    "detect_defects",
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
