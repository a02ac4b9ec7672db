"""``emdask view STORE``: an output store in neuroglancer, with one command.

Two local servers, both bound to 127.0.0.1 unless told otherwise: a static file server for
the store that sends CORS headers (a browser page may read it from another origin, as a
hosted neuroglancer must), and the ``neuroglancer`` Python package's viewer server (its
web client ships inside the package).  The viewer gets a layer for each image (raw,
affinities as RGB, synapse probabilities), each label image as a segmentation, and the
synapses as annotation points carrying their partner segments, and the errors stage's
split and merge candidates as points carrying their segments and scores, all in nm.
"""

from __future__ import annotations

import functools
import http.server
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["screenshot", "serve_store", "view"]

AFFINITY_SHADER = """\
void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)),
               toNormalized(getDataValue(2))));
}
"""


class _CORSHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with the headers a viewer on another origin needs."""

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        super().end_headers()

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a viewer makes thousands of requests: keep the terminal for the URL


def serve_store(store: str | Path, bind: str = "127.0.0.1", port: int = 0
                ) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve the store's folder (and nothing beside it: any web page may read what a CORS
    server serves) over HTTP with CORS headers, in a daemon thread; returns the server and
    the store's URL."""
    store = Path(store).resolve()
    handler = functools.partial(_CORSHandler, directory=str(store))
    server = http.server.ThreadingHTTPServer((bind, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="emdask-store").start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}"


@dataclass
class Viewing:
    """A running view: the neuroglancer viewer, its URL and the store's file server."""

    viewer: Any
    url: str
    store_url: str
    server: http.server.ThreadingHTTPServer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _labels(root) -> list[str]:
    from emdask.store import LABELS, has, quiet_listing

    with quiet_listing():
        return sorted(root[LABELS].group_keys()) if has(root, LABELS) else []


def view(store: str | Path, bind: str = "127.0.0.1", port: int = 0,
         store_port: int = 0) -> Viewing:
    """Open an emdask output store in a local neuroglancer viewer; returns the running
    :class:`Viewing` (its ``url`` is the page to open in a browser).

    Parameters
    ----------
    store
        A local output store of ``emdask run`` (or any zarr store laid out alike).
    bind
        Address both servers listen on ("0.0.0.0" to reach them from other machines).
    port, store_port
        The viewer's and the file server's ports (0: any free one).
    """
    import neuroglancer
    import pandas as pd
    import zarr

    from emdask.meshes import largest_segments
    from emdask.store import LABELS, RAW, has
    from emdask.volumes import open_volume

    store = Path(store)
    if not (store / "zarr.json").exists():
        raise FileNotFoundError(f"{store}: not a zarr store (no zarr.json); give the output "
                                "path of an emdask run")
    root = zarr.open_group(str(store), mode="r")
    server, store_url = serve_store(store, bind, store_port)
    neuroglancer.set_server_bind_address(bind, port)
    viewer = neuroglancer.Viewer()
    raw = open_volume(str(store), RAW) if has(root, RAW) else None
    with viewer.txn() as state:
        if raw is not None:
            # neuroglancer shows its first two dimensions in the main panel: x, y first
            vs = np.asarray(raw.attrs["voxel_size"], float)
            state.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"],
                                                            units="nm", scales=vs[::-1])
            centre = np.asarray(raw.attrs["offset"]) / vs + np.asarray(raw.shape) / 2
            state.position = centre[::-1]
            state.cross_section_scale = max(raw.shape[1:]) / 450  # fills a 500 px panel
            state.projection_scale = float(max(raw.shape)) * 1.5
        if has(root, RAW):
            state.layers["raw"] = neuroglancer.ImageLayer(source=f"zarr://{store_url}/{RAW}/")
        if has(root, "affinities"):
            state.layers["affinities"] = neuroglancer.ImageLayer(
                source=f"zarr://{store_url}/affinities/", shader=AFFINITY_SHADER)
            state.layers["affinities"].visible = False
        if has(root, "synapse_probabilities"):
            state.layers["synapse probabilities"] = neuroglancer.ImageLayer(
                source=f"zarr://{store_url}/synapse_probabilities/")
            state.layers["synapse probabilities"].visible = False
        labels = _labels(root)
        meshed = [n for n in labels if (store / LABELS / n / "meshes" / "info").exists()]
        shown = meshed[0] if meshed else max(
            (n for n in labels if n.startswith("segmentation_")), default=None)
        for name in labels:
            source = [f"zarr://{store_url}/{LABELS}/{name}/"]
            for kind in ("meshes", "skeletons"):  # the meshes and skeletons stages'
                if (store / LABELS / name / kind / "info").exists():
                    source.append(f"precomputed://{store_url}/{LABELS}/{name}/{kind}")
            state.layers[name] = neuroglancer.SegmentationLayer(source=source)
            state.layers[name].visible = name == shown
            # the EM shows through; every segment tinted, the largest few brighter and in 3-D
            state.layers[name].layer.selected_alpha = 0.4
            state.layers[name].layer.not_selected_alpha = 0.15
            if name == shown:  # a few of the largest segments shown in 3-D
                state.layers[name].layer.segments = largest_segments(
                    str(store), f"{LABELS}/{name}", 8)
        table = store / "synapses.parquet"
        if table.exists():
            rows = []
            for row in pd.read_parquet(table).itertuples():
                # pre and post where the direction is known, else the two ranked partners
                pair = ((row.pre, row.post) if getattr(row, "pre", 0) else
                        (getattr(row, "partner_1", 0), getattr(row, "partner_2", 0)))
                rows.append((str(row.id), (row.z_nm, row.y_nm, row.x_nm),
                             [int(s) for s in pair if s], None))
            state.layers["synapses"] = _points(neuroglancer, rows, shown)
        table = store / "errors.parquet"
        if table.exists():  # the errors stage's candidates, ranked for proofreading
            errors = pd.read_parquet(table)
            for kind in ("split", "merge"):
                rows = [(f"{kind}{i}", (r.z_nm, r.y_nm, r.x_nm), [int(s) for s in r.segments],
                         f"{kind} {r.score:.2f}{' (auto)' if r.auto else ''}")
                        for i, r in enumerate(errors[errors.kind == kind].itertuples())]
                if rows:
                    state.layers[f"{kind} candidates"] = _points(neuroglancer, rows, shown)
    return Viewing(viewer, str(viewer), store_url, server)


def _points(neuroglancer, rows: list, segmentation: str | None):
    """An annotation layer of points (id, (z, y, x) nm, segments, description), linked to
    the segmentation layer shown so that selecting a point selects its segments."""
    layer = neuroglancer.LocalAnnotationLayer(
        dimensions=neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm",
                                                scales=[1, 1, 1]),
        linked_segmentation_layer={"segments": segmentation} if segmentation else None)
    for name, point, segments, description in rows:
        layer.annotations.append(neuroglancer.PointAnnotation(
            id=name, point=list(point), segments=[segments] if segments else None,
            description=description))
    return layer


def screenshot(viewing: Viewing, path: str | Path, size: tuple[int, int] = (1200, 700),
               settle: float = 5.0) -> Path:
    """Render a view in headless Chromium and save it as a PNG (needs the ``selenium``
    package and Chromium with its driver, e.g. Debian's chromium and chromium-driver)."""
    import shutil
    import time

    import neuroglancer.webdriver

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    if browser is None or shutil.which("chromedriver") is None:
        raise FileNotFoundError("a screenshot needs Chromium and chromedriver (Debian: apt "
                                "install chromium chromium-driver) and pip install selenium")
    with viewing.viewer.txn() as state:
        state.layout = "xy-3d"
    with neuroglancer.webdriver.Webdriver(
            viewing.viewer, headless=True, browser="chrome", browser_binary_path=browser,
            window_size=size, print_logs=False,
            extra_command_line_args=["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
                                     "--enable-unsafe-swiftshader"]) as driver:
        driver.sync()
        time.sleep(settle)  # chunks and meshes arrive over HTTP
        shot = viewing.viewer.screenshot(size=size)
    path = Path(path)
    path.write_bytes(shot.screenshot.image)
    return path


def main(store: str, bind: str = "127.0.0.1", port: int = 0,
         screenshot_to: str | None = None) -> None:
    """``emdask view``: print the URL and serve until interrupted (or save a screenshot)."""
    import time

    viewing = view(store, bind, port)
    if screenshot_to:
        try:
            print(f"emdask view: {screenshot(viewing, screenshot_to)}", file=sys.stderr)
        finally:
            viewing.close()
        return
    print(f"emdask view: {store} served at {viewing.store_url}\n"
          f"open {viewing.url}\n(Ctrl-C stops)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    finally:
        viewing.close()
