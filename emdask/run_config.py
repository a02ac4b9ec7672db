"""The configuration of ``emdask run``: its sections as dataclasses, read from TOML or
YAML and checked before anything runs (:func:`load_run_config`), and what the segment
section implies (watershed parameters, the edge classifier, histogram bins, the names of
the label datasets)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

from emdask.config import from_dict, read_file

__all__ = [
    "JOBQUEUE",
    "AffinitiesSpec",
    "AlignSpec",
    "ClusterSpec",
    "ErrorSpec",
    "EvaluateSpec",
    "InputSpec",
    "MeshSpec",
    "OutputSpec",
    "PredictSpec",
    "RunConfig",
    "SegmentSpec",
    "SynapseSpec",
    "classifier_of",
    "histogram_bins",
    "label_datasets",
    "load_run_config",
    "watershed_params",
]


@dataclass
class InputSpec:
    """The raw EM volume (anything :func:`emdask.open_volume` reads)."""

    url: str
    dataset: str | None = None
    roi: list | None = None  # [[z0, y0, x0], [z1, y1, x1]], in roi_units
    roi_units: str = "voxel"  # or "nm"
    voxel_size: list | None = None  # override, e.g. for TIFF stacks (nm)
    # how intensities map to the nets' input: "auto" (the volume's 1-99% percentiles to
    # the model card's), "dtype", or [black, white] data values (emdask.intensity_range)
    intensity: str | list = "auto"


@dataclass
class OutputSpec:
    path: str  # zarr store (path or fsspec URL)
    chunks: list = field(default_factory=lambda: [64, 128, 128])  # blocks = storage chunks
    overwrite: bool = False  # replace outputs made with other parameters
    other_version: bool = False  # go on with a store made by another emdask version
    lease_timeout: float = 120.0  # s without heartbeat after which a run's lease is stale


@dataclass
class AlignSpec:
    """Section alignment and defect detection before prediction (:func:`emdask.align`)."""

    spacing: int = 32  # grid of the deformation fields, pixels
    neighbours: int = 2  # each section is matched against this many previous ones
    stiffness: float = 50.0  # bending penalty
    prior: float = 0.01  # pull of each section's field towards 0 (against drift)
    min_score: float = 0.2  # matches with a lower correlation are rejected
    window: int = 15  # defects: flat squares of this side are missing data
    missing_fraction: float = 0.95  # defects: a section this much missing is missing
    solve_window: int = 256  # the global solve holds at most this many sections at a time
    mask: bool = True  # affinities touching missing data are set to 0


@dataclass
class PredictSpec:
    model: str = "fibsem"  # a shipped model name or a path to a .pt file
    dtype: str = "uint8"  # affinities as uint8 (x255) or float32
    device: str = "auto"  # "cpu", "cuda" or "auto"
    patch: list | None = None  # tile blocks for GPU memory
    batch_size: int = 1
    check_voxel_size: bool = True
    precision: str = "auto"  # "float32", "bfloat16"; auto: bfloat16 where computed natively
    task_memory: str | int = "auto"  # per predict task; auto: 60% of a worker thread's share


@dataclass
class AffinitiesSpec:
    """Affinities the user already has, to segment instead of predicting: a (c, z, y, x)
    volume on the input's grid (the whole input, or its region of interest), float in
    [0, 1] or uint8; channels 0-2 the nearest-neighbour z, y, x affinities."""

    url: str
    dataset: str | None = None
    voxel_size: list | None = None  # for a file that carries none (nm, z-y-x)


@dataclass
class SegmentSpec:
    thresholds: list | None = None  # default: the boundary model card's threshold
    low: float = 0.0001
    high: float = 0.9999
    size_threshold: int = 25
    merge_threshold: float = 0.5
    dust_size: int = 0
    score: str = "mean"
    bins: int | None = None
    # score = "learned": the edge classifier, a shipped name ("fibsem") or a .json file
    classifier: str | None = None
    # the global step: "tree" (boxes of blocks, memory bounded by their faces), "global"
    # (one task; any score) or "auto" (the tree where the score allows it, beyond 64
    # blocks); identical results, see emdask.segment
    solve: str = "auto"


@dataclass
class SynapseSpec:
    """Synapse detection (a net trained with ``target = "synapses"``) and partners."""

    model: str  # a path to a .pt file (or a shipped model name)
    # the operating point; default: the synapse model card's
    threshold: float | None = None
    min_size: int | None = None  # voxels
    radius: list | None = None  # partner search (z, y, x voxels)
    # objects longer than this (nm, along any axis) are dropped; default the card's, if any
    max_extent: float | None = None
    # test-time augmentation: symmetries averaged (1, 2, 4, 8, 16); default the card's
    tta: int | None = None
    accept_licence: bool = False  # a shipped model with a non-commercial licence
    # Probabilities as stored: a synapse net's output crowds near 1 (the shipped one is used
    # at 0.99, between two uint8 steps), so float32 unless space matters more.
    dtype: str = "float32"
    segmentation: float | None = None  # which threshold's segmentation (default: last)
    direction_model: str | None = None  # a partner net (target "partners"): pre and post
    direction_patch: list = field(default_factory=lambda: [8, 96, 96])  # voxels per synapse


@dataclass
class MeshSpec:
    """Meshes and skeletons of one segmentation's segments, for viewers and for cable
    lengths (:mod:`emdask.meshes`, :mod:`emdask.skeletons`)."""

    segmentation: float | None = None  # which threshold's segmentation (default: last)
    max_error: float | None = None  # simplification error, nm (default: largest voxel)
    mesh_dust: int = 100  # segments smaller than this in a block get no mesh there
    skeleton_scale: float = 1.5  # TEASAR: branches kept if they reach beyond
    skeleton_const: float = 300.0  # scale x the distance to the boundary + const (nm)
    skeleton_dust: int = 100  # segments smaller than this in a block get no skeleton there


@dataclass
class ErrorSpec:
    """Error detection for proofreading (:mod:`emdask.errors`) in the segmentation that
    has skeletons: split candidates (touching segments, a split model) and merge
    candidates (a merge net along each skeleton), one ranked table ``errors.parquet``."""

    # a .json file or shipped name; None: no splits; "auto": the shipped model calibrated
    # for [segment] score at the boundary net's voxel size ("splits" for "mean",
    # "splits_learned" for "learned" at 10 nm; "splits_ssem" and "splits_ssem_learned" at
    # 40 x 10 x 10 nm)
    split_model: str | None = "auto"
    # a .pt file or shipped name; None: no merges; "auto": the shipped net for the boundary
    # net's voxel size ("merges" at 10 nm, "merges_ssem" at 40 x 10 x 10 nm)
    merge_model: str | None = "auto"
    min_size: int = 1000  # voxels: smaller segments are not examined
    # voxels: smaller segments join the touching segment of highest mean affinity
    # (emdask.errors.small_joins); default: the split model's card (0 without a model)
    floor: int | None = None
    # the correct stage's first decisions (edits.parquet): the candidates at or above their
    # model's threshold and the joins below the floor (true), or none (people add theirs)
    auto: bool = True


@dataclass
class EvaluateSpec:
    """Ground truth for the report (same grid as the input; the same ROI is cut out)."""

    url: str
    dataset: str = "labels/neuron_ids"
    synapses: str | None = None  # true synapse objects: detection precision, recall, F1
    cells: str | None = None  # per-section true cells: partner accuracy (with synapses)
    # voxels around a true synapse within which cells count as its true partners
    cells_radius: list = field(default_factory=lambda: [0, 6, 6])
    voxel_size: list | None = None  # for ground truth that carries none (nm, z-y-x)


@dataclass
class ClusterSpec:
    kind: str = "local"  # local, slurm, pbs, sge or lsf (dask-jobqueue)
    scheduler: str | None = None  # address of a running scheduler to attach to
    n_workers: int = 0  # local: 0 = one per core
    threads_per_worker: int = 1
    memory_limit: str | int = "auto"  # per worker, e.g. "4GB"
    dashboard: str = "127.0.0.1:0"  # Dask dashboard address (":8787" for all interfaces)
    processes: bool = True  # local: worker processes (False: threads in this process)
    jobqueue: dict = field(default_factory=dict)  # keywords of dask_jobqueue.<Kind>Cluster
    minimum_jobs: int = 0  # jobqueue: adaptive scaling between these
    maximum_jobs: int = 1
    retries: int = 3  # a failed (or timed-out) block task is retried this often
    task_timeout: float = 0.0  # seconds; a block task running longer is abandoned, retried
    allowed_failures: int = 10  # worker deaths a task survives (preemptible machines)


@dataclass
class RunConfig:
    input: InputSpec
    output: OutputSpec
    align: AlignSpec | None = None
    predict: PredictSpec = field(default_factory=PredictSpec)
    affinities: AffinitiesSpec | None = None  # given: segment these, no prediction
    segment: SegmentSpec = field(default_factory=SegmentSpec)
    synapses: SynapseSpec | None = None
    meshes: MeshSpec = field(default_factory=MeshSpec)
    errors: ErrorSpec | None = None
    evaluate: EvaluateSpec | None = None
    cluster: ClusterSpec = field(default_factory=ClusterSpec)


JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster",
             "lsf": "LSFCluster"}


def _check_ranges(cfg: RunConfig, where: str) -> None:
    """Values that have the right type but cannot work, named before anything runs (in a
    block task they would fail on every retry, or hang the cluster)."""
    from emdask.watershed import WatershedParams

    seg, c = cfg.segment, cfg.cluster
    try:
        WatershedParams(seg.low, seg.high, seg.size_threshold, seg.merge_threshold,
                        seg.dust_size)
    except ValueError as err:
        raise ValueError(f"{where}: [segment] {err}") from None
    device = cfg.predict.device
    limits = {
        "predict.device": (device in ("auto", "cpu", "cuda") or device.startswith("cuda:"),
                           "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        "predict.batch_size": (cfg.predict.batch_size >= 1, ">= 1"),
        "predict.precision": (cfg.predict.precision in ("auto", "float32", "bfloat16"),
                              "'auto', 'float32' or 'bfloat16'"),
        "predict.task_memory": (_bytes_ok(cfg.predict.task_memory),
                                "'auto' or a size such as '8GB'"),
        "cluster.n_workers": (c.n_workers >= 0, ">= 0 (0: one per core)"),
        "cluster.threads_per_worker": (c.threads_per_worker >= 1, ">= 1"),
        "cluster.retries": (c.retries >= 0, ">= 0"),
        "cluster.task_timeout": (c.task_timeout >= 0, ">= 0 seconds (0: none)"),
        "cluster.allowed_failures": (c.allowed_failures >= 0, ">= 0"),
        "cluster.maximum_jobs": (0 <= c.minimum_jobs <= c.maximum_jobs,
                                 ">= cluster.minimum_jobs >= 0"),
    }
    if cfg.align is not None:  # (align() checks it too, but only after the defects)
        a = cfg.align
        limits["align.solve_window"] = (a.solve_window >= 2 * a.neighbours,
                                        f">= 2 * align.neighbours = {2 * a.neighbours}")
    if cfg.synapses is not None:
        s = cfg.synapses
        limits["synapses.threshold"] = (s.threshold is None or 0 < s.threshold <= 1,
                                        "in (0, 1]")
        limits["synapses.min_size"] = (s.min_size is None or s.min_size >= 0, ">= 0")
        limits["synapses.max_extent"] = (s.max_extent is None or s.max_extent > 0, "> 0")
        limits["synapses.tta"] = (s.tta in (None, 1, 2, 4, 8, 16), "1, 2, 4, 8 or 16")
    if cfg.errors is not None:
        e = cfg.errors
        limits["errors.floor"] = (e.floor is None or e.floor >= 0, ">= 0")
        limits["errors.min_size"] = (e.min_size >= 0, ">= 0")
    for key, (ok, rule) in limits.items():
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise ValueError(f"{where}: {key} must be {rule}, got {value!r}")


def _bytes_ok(value) -> bool:
    from dask.utils import parse_bytes

    try:
        return value == "auto" or parse_bytes(value) > 0
    except (ValueError, TypeError):
        return False


def _card_defaults(cfg: RunConfig, where: str) -> RunConfig:
    """Settings left out take the operating point of the model cards: the boundary net's
    agglomeration threshold, the synapse detector's threshold, minimum size, partner
    radius and, where its card names one, longest object."""
    from emdask.models import card_defaults, model_card

    def card(name: str, key: str) -> dict:
        try:
            return card_defaults(model_card(name))
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{where}: {key} = {name!r}: {err}") from None

    if cfg.segment.thresholds is None and cfg.affinities is not None:
        raise ValueError(f"{where}: [segment] thresholds are needed with [affinities] (no "
                         "model card says which suit affinities made elsewhere)")
    if cfg.segment.thresholds is None:
        point = card(cfg.predict.model, "predict.model")
        if "threshold" not in point:
            raise ValueError(f"{where}: [segment] thresholds not given and the model card of "
                             f"{cfg.predict.model!r} names none")
        cfg = replace(cfg, segment=replace(cfg.segment, thresholds=[point["threshold"]]))
    spec = cfg.synapses
    point_keys = ("threshold", "min_size", "radius", "max_extent")
    if spec is not None and None in (getattr(spec, k) for k in point_keys):
        required = None in (spec.threshold, spec.min_size, spec.radius)
        try:
            point = card(spec.model, "synapses.model")
        except ValueError:
            if required:
                raise
            point = {}  # only max_extent, optional: a model not made yet is the preflight's
        missing = [k for k in point_keys[:3] if getattr(spec, k) is None and k not in point]
        if missing:
            raise ValueError(f"{where}: [synapses] {', '.join(missing)} not given and the "
                             f"model card of {spec.model!r} names none; set them")
        cfg = replace(cfg, synapses=replace(spec, **{  # max_extent: none if the card has none
            k: point[k] for k in point_keys if getattr(spec, k) is None and k in point}))
    spec = cfg.errors
    if spec is not None and "auto" in (spec.split_model, spec.merge_model):
        from emdask.errors import shipped_error_models
        from emdask.models import model_config

        # the segmentation is on the grid of the boundary net or of the given affinities
        try:
            if cfg.affinities is None:
                vs = model_config(cfg.predict.model).voxel_size
            else:
                a = cfg.affinities
                vs = open_configured(a.url, a.dataset, a.voxel_size, "affinities"
                                     ).attrs["voxel_size"]
        except (ValueError, OSError, KeyError) as err:
            raise ValueError(f"{where}: [errors] 'auto' chooses models by the "
                             f"segmentation's voxel size: {err}") from None
        vs = tuple(float(v) for v in vs)
        auto = dict(zip(("split_model", "merge_model"),
                        shipped_error_models(vs, cfg.segment.score), strict=True))
        for key, name in auto.items():
            if (getattr(spec, key) == "auto" and name is None
                    and (key == "merge_model" or cfg.segment.score in ("mean", "learned"))):
                raise ValueError(f"{where}: errors.{key} = 'auto': no shipped model for "
                                 f"segmentations at {tuple(vs)} nm by {cfg.segment.score} "
                                 "agglomeration; give a file, or none")
        spec = replace(spec, **{k: v for k, v in auto.items() if getattr(spec, k) == "auto"})
        cfg = replace(cfg, errors=spec)
    if spec is not None and spec.floor is None:
        from emdask.errors import load_split_model

        name = spec.split_model
        try:
            floor = load_split_model(name).floor if name else 0
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{where}: errors.split_model = {name!r}: {err}") from None
        cfg = replace(cfg, errors=replace(spec, split_model=name, floor=(
            floor if spec.floor is None else spec.floor)))
    return cfg


def load_run_config(path: str | Path | dict) -> RunConfig:
    """A run config from a TOML/YAML file (or a dict), checked: unknown keys, wrong
    types and impossible values are errors naming the key."""
    if isinstance(path, RunConfig):  # built in Python: checked and completed the same way
        where, values = "config", path
    else:
        where = str(path) if not isinstance(path, dict) else "config"
        values = read_file(path) if not isinstance(path, dict) else dict(path)
    cfg = from_dict(RunConfig, values, where)
    for key, value in (("segment.thresholds", cfg.segment.thresholds),
                       ("synapses.radius", cfg.synapses and cfg.synapses.radius),
                       ("evaluate.cells_radius", cfg.evaluate and cfg.evaluate.cells_radius),
                       ("input.roi", cfg.input.roi and [
                           v for row in cfg.input.roi
                           for v in (row if isinstance(row, list | tuple) else [row])]),
                       ("input.voxel_size", cfg.input.voxel_size),
                       ("input.intensity", cfg.input.intensity
                        if isinstance(cfg.input.intensity, list | tuple) else None)):
        if value and not all(isinstance(v, int | float) and not isinstance(v, bool)
                             for v in value):
            raise TypeError(f"{where}: {key} must be numbers, got {value!r}")
    intensity = cfg.input.intensity
    if (intensity not in ("auto", "dtype") if isinstance(intensity, str)
            else len(intensity) != 2 or intensity[0] >= intensity[1]):
        raise ValueError(f"{where}: input.intensity must be 'auto', 'dtype' or [black, white] "
                         f"with black < white, got {intensity!r}")
    _check_ranges(cfg, where)
    cfg = _card_defaults(cfg, where)
    if cfg.input.roi_units not in ("voxel", "nm"):
        raise ValueError(f"{where}: input.roi_units must be 'voxel' or 'nm', "
                         f"got {cfg.input.roi_units!r}")
    if len(cfg.output.chunks) != 3 or any(not isinstance(c, int) or c <= 0
                                          for c in cfg.output.chunks):
        raise ValueError(f"{where}: output.chunks must be 3 positive integers (z, y, x), "
                         f"got {cfg.output.chunks}")
    if cfg.predict.dtype not in ("uint8", "float32"):
        raise ValueError(f"{where}: predict.dtype must be 'uint8' or 'float32'")
    if cfg.synapses is not None and cfg.synapses.dtype not in ("uint8", "float32"):
        raise ValueError(f"{where}: synapses.dtype must be 'uint8' or 'float32', got "
                         f"{cfg.synapses.dtype!r}")
    radii = {"synapses.radius": cfg.synapses.radius if cfg.synapses else None,
             "evaluate.cells_radius": cfg.evaluate.cells_radius if cfg.evaluate else None}
    for key, r in radii.items():
        if r is not None and (len(r) != 3 or any(int(v) != v or v < 0 for v in r)
                              or max(r[1:]) == 0):
            raise ValueError(f"{where}: {key} must be 3 voxel counts (z, y, x), >= 0, with "
                             f"y or x > 0, got {list(r)}")
    if cfg.cluster.kind != "local" and cfg.cluster.kind not in JOBQUEUE:
        raise ValueError(f"{where}: cluster.kind must be 'local' or one of "
                         f"{sorted(JOBQUEUE)}, got {cfg.cluster.kind!r}")
    from emdask.agglomerate import _check_thresholds

    try:
        _check_thresholds(cfg.segment.thresholds)
        if cfg.segment.score == "learned" and cfg.segment.classifier is None:
            raise ValueError("score = 'learned' needs classifier = a shipped name ('fibsem') "
                             "or a .json file from emdask.learn_agglomeration")
        histogram_bins(cfg.segment)
        from emdask.segmentation import use_tree

        use_tree(cfg.segment.solve, cfg.segment.score)  # checks the words
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{where}: [segment] {err}") from None
    if cfg.meshes.segmentation is not None and (
            cfg.meshes.segmentation not in cfg.segment.thresholds):
        raise ValueError(f"{where}: meshes.segmentation = {cfg.meshes.segmentation} is not "
                         f"one of the thresholds {cfg.segment.thresholds}")
    if cfg.synapses is not None and cfg.synapses.segmentation is not None and (
            cfg.synapses.segmentation not in cfg.segment.thresholds):
        raise ValueError(f"{where}: synapses.segmentation = {cfg.synapses.segmentation} is "
                         f"not one of the thresholds {cfg.segment.thresholds}")
    names = label_datasets(cfg.segment)
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: [segment] thresholds {cfg.segment.thresholds} give "
                         f"the same dataset names {names}; use fewer digits")
    return cfg


def watershed_params(seg: SegmentSpec):
    from emdask.watershed import WatershedParams

    return WatershedParams(seg.low, seg.high, seg.size_threshold, seg.merge_threshold,
                           seg.dust_size)


@functools.lru_cache(maxsize=4)
def _load_classifier(name: str, stamp: int):
    from emdask.learn_agglomeration import load_classifier

    return load_classifier(name)


def classifier_of(seg: SegmentSpec):
    """The edge classifier of a learned score (None for the other scores); cached per
    process, and read again when its file changes."""
    if seg.score != "learned":
        return None
    path = Path(seg.classifier)
    return _load_classifier(seg.classifier, path.stat().st_mtime_ns
                            if path.suffix == ".json" and path.exists() else 0)


def histogram_bins(seg: SegmentSpec) -> int:
    """Histogram bins of the block graphs for the section's score."""
    from emdask.segmentation import score_bins

    return score_bins(seg.score, seg.bins, classifier_of(seg))


def label_datasets(seg: SegmentSpec) -> list[str]:
    return ["fragments"] + [f"segmentation_{t:g}" for t in seg.thresholds]


def open_configured(url: str, dataset: str | None, voxel_size, section: str):
    """open_volume, with the config key to set where the file has no voxel size."""
    from emdask.volumes import VolumeError, open_volume

    try:
        return open_volume(url, dataset, voxel_size=voxel_size)
    except VolumeError as err:
        if "voxel size is missing" not in str(err):
            raise
        raise VolumeError(f"{err} (in a run config: [{section}] voxel_size = [z, y, x])"
                          ) from None
