"""DICOM series for tests, made of pydicom's real CT slice (CT_small.dcm, 128x128, Hounsfield units).

Each slice is the real slice with its geometry and identity changed, and a bright block whose row says
which slice it is, so a test can tell from the pixels which slice a picture shows.
"""

from __future__ import annotations

import copy
import random
import uuid
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

# Patient fields no output of the product may ever hold (the PHI test greps for each).
PHI = {"PatientName": "Quintessa^Zzyzxbury", "PatientID": "PHI-7731-XQ", "PatientBirthDate": "19230405",
       "OtherPatientIDs": "ALTID-99881", "PatientAddress": "17 Quarry Lane Xanadu", "AccessionNumber": "ACC555123"}


def base_slice() -> pydicom.Dataset:
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None, "pydicom bundles CT_small.dcm"
    return pydicom.dcmread(path)


def marked(ds: pydicom.Dataset, k: int) -> None:
    """A block at row 8·(k mod 14) of the slice's own units, 2000 raw units bright: slice k, visibly."""
    arr = ds.pixel_array.copy()
    row = 8 * (k % 14)
    arr[row:row + 6, 100:120] = 2000
    ds.PixelData = arr.astype(arr.dtype).tobytes()


def mark_row(picture: np.ndarray) -> int:
    """The row of the bright block in a rendered 128x128 slice (its first row brighter than the rest)."""
    column = picture[:, 100:120].mean(axis=1)
    return int(np.argmax(column > column.max() - 1))


def write_series(folder: Path, n: int, *, spacing: float = 2.5, gap_after: int | None = None, gap: float = 0.0,
                 series_number: int = 3, description: str = "AXIAL", shuffle: bool = True, seed: int = 0,
                 orientation=(1, 0, 0, 0, 1, 0), phi: bool = False, series_uid: str | None = None,
                 names: str = "uuid") -> list[float]:
    """n slices of one series in `folder`, under random file names, InstanceNumber running backwards (so
    only the positions order them right); returns the positions along the normal (mm), in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    base = base_slice()
    uid = series_uid or generate_uid()
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    positions = []
    z = 0.0
    for k in range(n):
        positions.append(round(z, 2))
        z += spacing + (gap if gap_after is not None and k == gap_after else 0.0)
    origin = np.array([-80.0, -60.0, 10.0])
    for k in order:
        ds = copy.deepcopy(base)
        marked(ds, k)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = n - k  # backwards on purpose
        ds.ImagePositionPatient = [float(v) for v in origin + normal * positions[k]]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        if phi:
            for tag, value in PHI.items():
                setattr(ds, tag, value)
        name = f"{uuid.UUID(int=random.Random(seed * 100003 + k).getrandbits(128)).hex}.dcm" if names == "uuid" \
            else f"IM{k:04d}"
        ds.save_as(folder / name, enforce_file_format=True)
    return [round(float(np.dot(origin, normal)) + p, 2) for p in positions]
