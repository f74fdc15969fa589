"""Medical images: DICOM windowing, colour, frames, 16-bit, orientation, and hostile files.

Expected pixels are computed here with numpy from pydicom's raw pixel array and the header,
independently of runtime/images/dicom.py.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
from conftest import run_cli
from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.images.dicom import parse_window
from huatuo_local.runtime.images.loader import LoadOptions, load_rgb
from PIL import Image
from pydicom.data import get_testdata_file


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom bundles {name}"
    return path


def voi_linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    y = ((x.astype(np.float64) - (c - 0.5)) / (w - 1) + 0.5) * 255
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def gray(img: Image.Image) -> np.ndarray:
    a = np.asarray(img)
    assert a.ndim == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def hounsfield(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_ct_rescale_and_presets():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = hounsfield(ds)
    assert ds.pixel_array.min() >= 0 and hu.min() < -800, "the modality LUT turns raw units into Hounsfield units"
    presets = {"lung": (-600, 1500), "mediastinum": (50, 350), "bone": (400, 1800), "brain": (40, 80),
               "abdomen": (40, 400), "liver": (60, 160)}  # the usual radiology presets, each checked
    for preset, (c, w) in presets.items():
        got = gray(load_rgb(path, LoadOptions(window=parse_window(preset))))
        np.testing.assert_array_equal(got, voi_linear(hu, c, w))
    custom = gray(load_rgb(path, LoadOptions(window=parse_window("50,350"))))
    np.testing.assert_array_equal(custom, voi_linear(hu, 50, 350))
    # No window in the header: the 0.5-99.5 percentile range of the Hounsfield values.
    lo, hi = np.percentile(hu, [0.5, 99.5])
    want = np.clip(np.round((hu - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    got = gray(load_rgb(path))
    np.testing.assert_array_equal(got, want)
    assert got.std() > 30  # and the window spreads the values (not a flat picture equal by accident)


def test_mr_uses_the_files_window_and_monochrome1_inverts(tmp_path):
    path = bundled("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    want = voi_linear(ds.pixel_array, c, w)
    np.testing.assert_array_equal(gray(load_rgb(path)), want)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    np.testing.assert_array_equal(gray(load_rgb(inverted)), 255 - want)


def test_compressed_transfer_syntaxes_decode_or_name_the_decoder():
    mr = gray(load_rgb(bundled("MR_small.dcm")))
    np.testing.assert_array_equal(gray(load_rgb(bundled("MR_small_RLE.dcm"))), mr)  # RLE lossless
    np.testing.assert_array_equal(gray(load_rgb(bundled("MR_small_jp2klossless.dcm"))), mr)  # JPEG 2000
    # JPEG-LS lossless through GDCM (installed with huatuo-local), as the release's users' PACS exports use.
    ls = pydicom.dcmread(bundled("MR_small_jpeg_ls_lossless.dcm"))
    assert ls.file_meta.TransferSyntaxUID.name == "JPEG-LS Lossless Image Compression"
    np.testing.assert_array_equal(gray(load_rgb(bundled("MR_small_jpeg_ls_lossless.dcm"))), mr)
    # 12-bit JPEG Extended: no decoder installed reads it; the one line says why and what would.
    with pytest.raises(HuatuoError, match=r"JPEG-lossy.dcm: cannot decode JPEG Extended \(Process 2 and 4\) pixel "
                                          r"data at 12 bits: .*pylibjpeg-libjpeg.*GPL-3.0"):
        load_rgb(bundled("JPEG-lossy.dcm"))


def test_a_dicom_without_its_preamble_is_read_as_its_bytes_say(tmp_path):
    """Issue 33: `no_meta.dcm` (a bare dataset, no preamble or 'DICM') said "Use force=True", which no user
    of the CLI can do. It is read; this one holds no pixel data, and says so."""
    for name in ("no_meta.dcm", "ExplVR_BigEndNoMeta.dcm"):
        with pytest.raises(HuatuoError, match=rf"^{'.*' + name}: DICOM file without pixel data"):
            load_rgb(bundled(name))
    # A bare dataset that holds an image: CT_small's elements without its preamble and file meta.
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    bare = tmp_path / "bare.dcm"
    ds.preamble = None
    del ds.file_meta
    ds.save_as(bare, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(np.asarray(load_rgb(bare)), np.asarray(load_rgb(bundled("CT_small.dcm"))))


def test_colour_dicoms():
    rgb = np.asarray(load_rgb(bundled("SC_rgb_rle.dcm"))).astype(int)
    ds = pydicom.dcmread(bundled("SC_rgb_rle.dcm"))
    np.testing.assert_array_equal(rgb, ds.pixel_array)
    ybr = np.asarray(load_rgb(bundled("SC_ybr_full_422_uncompressed.dcm"))).astype(int)
    jpeg = np.asarray(load_rgb(bundled("SC_rgb_jpeg_dcmtk.dcm"))).astype(int)
    # The same test picture (colour bands) through YBR_FULL_422 and a YBR JPEG: close to the RGB one.
    assert np.abs(ybr - rgb).mean() < 3 and np.abs(jpeg - rgb).mean() < 6
    palette = np.asarray(load_rgb(bundled("examples_palette.dcm")))
    pds = pydicom.dcmread(bundled("examples_palette.dcm"))
    lut = np.stack([np.frombuffer(pds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2")
                    for c in ("Red", "Green", "Blue")], axis=1)
    first = int(pds.RedPaletteColorLookupTableDescriptor[1])
    want = lut[np.clip(pds.pixel_array.astype(int) - first, 0, len(lut) - 1)]
    np.testing.assert_array_equal(palette, np.round(want / 65535 * 255).astype(np.uint8))


def test_multi_frame_defaults_to_the_middle_frame():
    path = bundled("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), frames[1])
    np.testing.assert_array_equal(np.asarray(load_rgb(path, LoadOptions(frame=0))), frames[0])
    with pytest.raises(HuatuoError, match="--frame 7 is out of range"):
        load_rgb(path, LoadOptions(frame=7))


def test_multi_frame_tiff_and_gif_default_to_the_middle_frame_too(tmp_path):
    """Issue 33: TIFF and GIF stacks used frame 0 though --help (and DICOM) say the middle one."""
    for suffix in ("tiff", "gif"):
        path = tmp_path / f"stack.{suffix}"
        frames = [Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)) for i in range(5)]
        frames[0].save(path, save_all=True, append_images=frames[1:])
        assert np.asarray(load_rgb(path))[0, 0, 0] == 80  # frame 2 of 0-4
        assert np.asarray(load_rgb(path, LoadOptions(frame=4)))[0, 0, 0] == 160
        with pytest.raises(HuatuoError, match=r"--frame 5 is out of range \(the file has 5 frames, 0-4\)"):
            load_rgb(path, LoadOptions(frame=5))


def test_sixteen_bit_png_and_tiff(tmp_path):
    rng = np.random.default_rng(0)
    values = (rng.random((60, 80)) * 4000).astype(np.uint16) + 100
    for ext in ("png", "tiff"):
        path = tmp_path / f"x.{ext}"
        Image.fromarray(values).save(path)
        lo, hi = np.percentile(values.astype(np.float64), [0.5, 99.5])
        want = np.clip(np.round((values - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(gray(load_rgb(path)), want)
        np.testing.assert_array_equal(gray(load_rgb(path, LoadOptions(window=(2000, 1000)))),
                                      voi_linear(values, 2000, 1000))


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = np.asarray(load_rgb(path))
    assert out.shape == (40, 20, 3)
    assert out[2, 10, 2] > 200 and out[-3, 10, 0] > 200  # blue now on top, red below


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h but carries almost no data (how a decompression bomb starts)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + _chunk(b"IEND", b""))


def _hostile_corpus(root) -> dict[str, object]:
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good, "PNG")
    good_png = good.getvalue()
    jpg = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(jpg, "JPEG")
    mr = pydicom.dcmread(bundled("MR_small.dcm"))
    files: dict[str, object] = {
        "empty.png": b"",
        "text.png": b"This is a clinical note, not an image.\n",
        "truncated.png": good_png[: len(good_png) // 2],
        "truncated.jpg": jpg.getvalue()[: len(jpg.getvalue()) // 3],
        "random.jpg": np.random.default_rng(2).bytes(4096),
        "random.dcm": np.random.default_rng(3).bytes(4096),
        "header-only.png": _png_header_only(64, 64),
        "bomb.png": _png_header_only(30000, 30000),
        "huge-dims.png": _png_header_only(2**31 - 1, 2**31 - 1),
        "fake-dicm.bin": b"\0" * 128 + b"DICM" + np.random.default_rng(4).bytes(300),
        "bad-crc.png": good_png[:30] + b"\xff\xff\xff\xff" + good_png[34:],
        "garbage.bmp": b"BM" + np.random.default_rng(5).bytes(100),
        "garbage.gif": b"GIF89a" + np.random.default_rng(6).bytes(50),
        "garbage.webp": b"RIFF\x10\x00\x00\x00WEBPVP8 " + np.random.default_rng(7).bytes(20),
        "garbage.tiff": b"II*\x00\x08\x00\x00\x00" + np.random.default_rng(8).bytes(40),
        "no-pixels.dcm": bundled("rtplan.dcm"),
        "truncated.dcm": bundled("MR_truncated.dcm"),
        "undecodable.dcm": bundled("JPEG-lossy.dcm"),
        "folder.png": "DIR",
        "missing.png": None,
    }
    mr.PhotometricInterpretation = "HSV"
    hsv = root / "hsv.dcm"
    mr.save_as(hsv)
    files["hsv.dcm"] = str(hsv)
    paths = {}
    for name, content in files.items():
        p = root / name
        if content is None:
            pass
        elif content == "DIR":
            p.mkdir()
        elif isinstance(content, str):
            p = type(root)(content)
        else:
            p.write_bytes(content)
        paths[name] = p
    return paths


def test_hostile_corpus_gives_only_clear_errors(tmp_path):
    corpus = _hostile_corpus(tmp_path)
    assert len(corpus) >= 20
    for name, path in corpus.items():
        with pytest.raises(HuatuoError) as info:
            load_rgb(path, LoadOptions(max_pixels=50_000_000))
        message = str(info.value)
        assert str(path) in message and "\n" not in message, (name, message)


def test_hostile_files_through_the_cli_and_the_session_survives(tmp_path, converted):
    corpus = _hostile_corpus(tmp_path)
    bomb = run_cli("preview", str(corpus["bomb.png"]), "-o", str(tmp_path / "out.png"))
    assert bomb.returncode != 0 and "image too large" in bomb.stderr and "--max-pixels" in bomb.stderr
    # --max-pixels moves the limit both ways; it counts the square the picture is padded to (200x200 here).
    wide = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(5).random((150, 200, 3)) * 255).astype(np.uint8)).save(wide)
    low = run_cli("preview", str(wide), "--max-pixels", "39999", "-o", str(tmp_path / "w.png"))
    assert low.returncode == 1 and "padded to a 200x200 square = 40000 pixels, limit 39999" in low.stderr
    enough = run_cli("preview", str(wide), "--max-pixels", "40000", "-o", str(tmp_path / "w.png"))
    assert enough.returncode == 0 and Image.open(tmp_path / "w.png").size == (336, 336), enough.stderr
    for name in ("empty.png", "text.png", "bomb.png", "no-pixels.dcm", "hsv.dcm", "folder.png"):
        proc = run_cli("preview", str(corpus[name]), "-o", str(tmp_path / "out.png"))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, name
        assert proc.stderr.strip().splitlines()[-1].startswith("error: "), (name, proc.stderr)
        assert not (tmp_path / "out.png").exists()
    from huatuo_local import HuatuoChatbot

    with HuatuoChatbot(converted().manifest_path, temperature=0, max_new_tokens=4, prefix_cache=False) as bot:
        for name in ("truncated.jpg", "random.dcm", "bomb.png"):
            with pytest.raises(HuatuoError):
                bot.chat("What is this?", [corpus[name]])
        assert bot.chat("What is this?", [bundled("CT_small.dcm")]) is not None
        assert bot.last_reply.counters.images_encoded == 1


def test_preview_writes_what_the_model_sees(tmp_path):
    out = tmp_path / "ct.png"
    proc = run_cli("preview", bundled("CT_small.dcm"), "--window", "lung", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600  # a patient's image: owner-only, as transcripts (issue 36)
    seen = np.asarray(Image.open(out))
    assert seen.shape == (336, 336, 3)
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    want = Image.fromarray(voi_linear(hounsfield(ds), -600, 1500)).convert("RGB").resize((336, 336),
                                                                                         Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(seen, np.asarray(want))
    bad = run_cli("preview", bundled("CT_small.dcm"), "--window", "sideways", "-o", str(out))
    assert bad.returncode != 0 and "give a preset" in bad.stderr
    # The file is what its name says: a TIFF holds the same pixels; a lossy name is refused, nothing written.
    tif = run_cli("preview", bundled("CT_small.dcm"), "--window", "lung", "-o", str(tmp_path / "ct.tif"))
    assert tif.returncode == 0 and Image.open(tmp_path / "ct.tif").format == "TIFF"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ct.tif")), seen)
    jpg = run_cli("preview", bundled("CT_small.dcm"), "-o", str(tmp_path / "ct.jpg"))
    assert jpg.returncode == 1 and "write a lossless file" in jpg.stderr and not (tmp_path / "ct.jpg").exists()


def test_a_window_on_an_8_bit_image_is_said_to_be_ignored(converted, tmp_path):
    rgb = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(2).random((40, 50, 3)) * 255).astype(np.uint8)).save(rgb)
    proc = run_cli("chat", str(rgb), "-p", "hi", "--window", "lung", "--model", str(converted().manifest_path),
                   "--max-tokens", "2", "--no-prefix-cache")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == (f"warning: {rgb}: --window applies to DICOM and 16-bit grayscale images; this "
                                   "8-bit image is shown as it is")


def test_chat_about_a_dicom_end_to_end(converted):
    proc = run_cli("chat", bundled("CT_small.dcm"), "-p", "Which organ is shown?", "--window", "lung",
                   "--model", str(converted().manifest_path), "--temperature", "0", "--max-tokens", "6", "--json",
                   "--no-prefix-cache")
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert out["counters"]["images_encoded"] == 1 and out["tokens"]["generated"] >= 1


def test_fifos_are_refused_not_waited_on(converted, tmp_path):
    """Issue 36: a FIFO given as an image or a model blocked the reader forever."""
    import os

    model = converted()
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    proc = run_cli("chat", str(fifo), "-p", "hi", "--model", str(model.manifest_path), timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {fifo}: not a regular file, not an image"
    gguf = tmp_path / "model.gguf"
    os.mkfifo(gguf)
    (tmp_path / "mmproj-x.gguf").write_bytes(model.mmproj_path.read_bytes())
    proc = run_cli("chat", "-p", "hi", "--model", str(gguf), timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {gguf}: not a regular file; a model is a .gguf file"
