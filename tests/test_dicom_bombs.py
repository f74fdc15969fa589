"""DICOM files that would decode to gigabytes, lie about their frames, or ask for a frame that is not there."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pydicom
from conftest import ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid


def _dataset(rows: int, cols: int, frames: int, syntax) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def rle_bomb(path, side: int = 20000) -> None:
    """One 8-bit frame of side x side pixels, RLE-compressed to about side*side/64 bytes."""
    ds = _dataset(side, side, 1, RLELossless)
    run = b"\x81\x00" * (side * side // 128)  # PackBits: repeat the next byte 128 times
    header = np.zeros(16, dtype="<u4")
    header[0], header[1] = 1, 64
    ds.PixelData = encapsulate([header.tobytes() + run])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def many_frames_header(path, frames: int = 2000) -> None:
    ds = _dataset(256, 256, frames, ExplicitVRLittleEndian)
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


# Three 32x32 frames, each its own pattern (a frame mixed up with another shows in the pixels).
FRAMES = np.stack([((np.arange(32 * 32) * (k + 1) + 37 * k) % 256).reshape(32, 32) for k in range(3)]).astype(np.uint8)


def three_frames(path) -> None:
    ds = _dataset(32, 32, 3, ExplicitVRLittleEndian)
    ds.PixelData = FRAMES.tobytes()
    ds.save_as(path, enforce_file_format=True)


def preview_with_peak_memory(image, out, *extra) -> tuple[subprocess.CompletedProcess, int]:
    """`huatuo-local preview` in a fresh process that reports its own peak RSS (KiB) on its last line."""
    code = textwrap.dedent("""
        import atexit, sys
        # VmHWM is this address space's peak; ru_maxrss would include the parent's RSS at fork.
        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    print("PEAK_KIB", line.split()[1], file=sys.stderr)
        atexit.register(peak)
        from huatuo_local.runtime.cli import main
        sys.argv = ["huatuo-local"] + sys.argv[1:]
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code, "preview", str(image), "-o", str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    peak = int(proc.stderr.strip().splitlines()[-1].split()[1])
    proc.stderr = "\n".join(proc.stderr.strip().splitlines()[:-1])
    return proc, peak


def _one_error_line(proc, *needles) -> None:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_small_rle_file_that_decodes_to_gigabytes_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.dcm"
    rle_bomb(bomb)
    assert bomb.stat().st_size < 8 * 1024 * 1024
    proc, peak_kib = preview_with_peak_memory(bomb, tmp_path / "out.png")
    _one_error_line(proc, str(bomb), "image too large", "20000x20000", "--max-pixels")
    assert peak_kib < 400 * 1024, f"peak {peak_kib / 1024:.0f} MiB"
    assert not (tmp_path / "out.png").exists()


def test_frame_count_beyond_the_data_is_one_line_and_cheap(tmp_path):
    liar = tmp_path / "liar.dcm"
    many_frames_header(liar)
    proc, peak_kib = preview_with_peak_memory(liar, tmp_path / "out.png")
    _one_error_line(proc, str(liar), "truncated pixel data", "2000 frame(s)")
    assert peak_kib < 400 * 1024
    rle = tmp_path / "rle-liar.dcm"
    ds = _dataset(64, 64, 2000, RLELossless)
    header = np.zeros(16, dtype="<u4")
    header[0], header[1] = 1, 64
    ds.PixelData = encapsulate([header.tobytes() + b"\x81\x00" * 32])
    ds["PixelData"].VR = "OB"
    ds.save_as(rle, enforce_file_format=True)
    proc, _ = preview_with_peak_memory(rle, tmp_path / "out.png")
    _one_error_line(proc, str(rle))


def test_only_the_requested_frame_is_decoded_and_a_frame_past_the_end_is_one_line(tmp_path, monkeypatch):
    from huatuo_local.models.errors import HuatuoError
    from huatuo_local.runtime.images.dicom import read_dicom

    f = tmp_path / "three.dcm"
    three_frames(f)
    decoded = []
    original = pydicom.Dataset.pixel_array.fget

    def spy(self):
        arr = original(self)
        decoded.append(arr.shape)
        return arr

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(spy))
    img = read_dicom(f, frame=2)
    assert decoded == [(32, 32)], decoded  # one frame, not all three
    # Frame 2's own pixels, through the default window (no window in the header: 0.5-99.5 percentiles).
    lo, hi = np.percentile(FRAMES[2].astype(np.float64), [0.5, 99.5])
    expected = np.clip(np.round((FRAMES[2] - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(img)[..., 0], expected)
    assert not np.array_equal(FRAMES[2], FRAMES[1]) and not np.array_equal(FRAMES[2], FRAMES[0])
    monkeypatch.undo()
    proc, _ = preview_with_peak_memory(f, tmp_path / "out.png", "--frame", "5")
    _one_error_line(proc, "--frame 5 is out of range", "3 frames")
    try:
        read_dicom(f, frame=-1)
    except HuatuoError as exc:
        assert "out of range" in str(exc)
    else:
        raise AssertionError("a negative frame was accepted")
