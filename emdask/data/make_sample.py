"""Rebuild the bundled sample from the FlyEM medulla cube in ``../shared/data``.

Usage: ``python -m emdask.data.make_sample [path/to/medulla_fib_sample2_250cube.h5]``
"""

import shutil
import sys
from pathlib import Path

from emdask.data import sample_path
from emdask.volumes import cutout, open_volume, save_volume

DEFAULT = "../shared/data/flyem_medulla_fib_neuroproof_sample2/medulla_fib_sample2_250cube.h5"
BOX = ((200, 0, 0), (250, 192, 192))  # voxels, z-y-x: inside the never-trained-on region


def main(src: str = DEFAULT) -> None:
    out = sample_path()
    shutil.rmtree(out, ignore_errors=True)
    for src_ds, dst_ds in (("raw", "raw"), ("labels/neuron_ids", "neuron_ids")):
        vol = cutout(open_volume(src, src_ds), *BOX, units="voxel")
        save_volume(vol, out, dst_ds, chunks=(25, 96, 96))
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(*sys.argv[1:])
