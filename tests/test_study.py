"""DICOM studies (folders, zips, DICOMDIRs) → the slices the model sees: grouping, order, choice, montage,
limits and hostile files. Series are made of pydicom's real CT slice (tests/dicom_series.py)."""

from __future__ import annotations

import gc
import zipfile

import numpy as np
import pydicom
import pytest
from dicom_series import PHI, mark_row, write_series
from huatuo_local.models.errors import HuatuoError
from huatuo_local.runtime.images import study as st
from huatuo_local.runtime.images.loader import LoadOptions, load_rgb


@pytest.fixture(scope="module")
def ct300(tmp_path_factory):
    """300 shuffled slices with a 40 mm gap after slice 149, plus a hostile file and a text file."""
    folder = tmp_path_factory.mktemp("ct300")
    positions = write_series(folder / "series", 300, gap_after=149, gap=40.0)
    (folder / "series" / "evil.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"A" * 64)
    (folder / "README.txt").write_text("not an image")
    return folder, positions


def test_a_shuffled_series_is_ordered_by_position_along_the_normal(ct300):
    folder, positions = ct300
    study = st.read_study(folder)
    assert study.kind == "folder" and len(study.series) == 1
    series = study.series[0]
    assert series.ordered_by == "position" and len(series.slices) == 300
    assert [s.position for s in series.slices] == positions
    assert study.skipped == 2  # the hostile file and the text file, counted, never decoded
    # InstanceNumber runs backwards in these files: the order is the geometry's, not the numbers'.
    assert [s.instance for s in series.slices] == list(range(300, 0, -1))


def test_an_oblique_series_is_ordered_along_its_own_normal(tmp_path):
    c, s = np.cos(0.5), np.sin(0.5)
    positions = write_series(tmp_path / "obl", 12, orientation=(1, 0, 0, 0, c, s), seed=3)
    series = st.read_study(tmp_path / "obl").series[0]
    assert series.ordered_by == "position"
    assert [x.position for x in series.slices] == pytest.approx(positions, abs=0.01)


def test_auto_spaces_by_position_so_a_gap_does_not_bunch_the_choice(ct300):
    folder, positions = ct300
    series = st.read_study(folder).series[0]
    chosen = st.choose_slices(series, "auto:4", None, "t")
    first, last = positions[0], positions[-1]
    for k, index in enumerate(chosen):
        target = first + (k + 0.5) / 4 * (last - first)
        assert abs(positions[index] - target) <= 2.5 / 2 + 1e-6, (index, target)
    # By index the four would be 37, 112, 187, 262; the 40 mm gap after 149 moves the middle ones.
    assert chosen != [37, 112, 187, 262]
    assert st.choose_slices(series, None, None, "t") == [int(np.argmin(np.abs(np.array(positions)
                                                                               - (first + last) / 2)))]
    assert len(st.choose_slices(series, "auto", (3, 3), "t")) == 9


def test_ranges_and_indices(ct300):
    series = st.read_study(ct300[0]).series[0]
    assert st.choose_slices(series, "40:80:10", None, "t") == [40, 50, 60, 70]
    assert st.choose_slices(series, "0,150,-1", None, "t") == [0, 150, 299]
    for bad, needle in [("300", "out of range"), ("a:b", "give auto"), ("5:5", "chooses no slice"),
                        ("0:70:10", "at most 6 images"), ("auto:0", "give auto")]:
        with pytest.raises(HuatuoError, match=needle):
            st.choose_slices(series, bad, None, "t")
    with pytest.raises(HuatuoError, match="montage has 4 cells"):
        st.choose_slices(series, "0:5", (2, 2), "t")


def test_each_chosen_slice_is_the_file_the_order_says(ct300):
    folder, _ = ct300
    pictures = st.expand(folder, slices="20,21,22")
    assert [p.indices for p in pictures] == [(20,), (21,), (22,)]
    series = pictures[0].series
    for p in pictures:
        img = load_rgb_input(p)
        want = load_rgb(str(folder / series.slices[p.indices[0]].name))
        assert mark_row(np.asarray(img)[..., 0]) == 8 * (p.indices[0] % 14)
        if p.indices[0] == 21:  # the middle slice sets the window, so its picture is the file's own
            np.testing.assert_array_equal(np.asarray(img), np.asarray(want))
        record = img.info[st.SOURCE_INFO]
        assert record["slices"] == list(p.indices) and record["series_uid_sha256"] == series.uid_digest
        assert record["files"] == [series.slices[p.indices[0]].name]


def load_rgb_input(picture):
    from huatuo_local.runtime.images.loader import load_input

    return load_input(picture, LoadOptions())


def test_montage_tiles_the_slices_in_order_with_one_window(ct300):
    folder, positions = ct300
    (picture,) = st.expand(folder, slices="auto", montage=(2, 2), window=(40.0, 400.0))
    img = load_rgb_input(picture)
    assert img.size == (2 * 128, 2 * 128)
    a = np.asarray(img)[..., 0]
    for place, k in enumerate(picture.indices):
        y, x = (place // 2) * 128, (place % 2) * 128
        cell = a[y:y + 128, x:x + 128]
        assert mark_row(cell) == 8 * (k % 14)
    record = img.info[st.SOURCE_INFO]
    assert record["montage"] == "2x2" and record["window"] == {"center": 40.0, "width": 400.0, "source": "chosen"}
    assert record["positions_mm"] == [positions[k] for k in picture.indices]
    # The tile's label (slice number and position) is drawn in yellow in its top-left corner.
    corner = np.asarray(img)[0:20, 0:100]
    assert ((corner[..., 0] > 200) & (corner[..., 1] > 200) & (corner[..., 2] < 60)).any()


def test_mixed_series_need_a_choice_in_one_line(tmp_path):
    write_series(tmp_path / "s", 5, series_number=2, description="SCOUT", seed=1)
    write_series(tmp_path / "s", 7, series_number=5, description="AXIAL", seed=2)
    with pytest.raises(HuatuoError) as err:
        st.expand(tmp_path / "s")
    text = str(err.value)
    assert "\n" not in text and "--series" in text and "1) #2 CT 'SCOUT' 5 slice(s)" in text
    assert "2) #5 CT 'AXIAL' 7 slice(s)" in text
    assert len(st.expand(tmp_path / "s", series="5", slices="auto:3")) == 3
    uid = st.read_study(tmp_path / "s").series[0].uid
    assert st.expand(tmp_path / "s", series=uid)[0].series.number == 2
    with pytest.raises(HuatuoError, match="no series 9"):
        st.expand(tmp_path / "s", series="9")


def test_a_zip_is_read_in_memory_and_a_dicomdir_through_its_records(tmp_path):
    positions = write_series(tmp_path / "s", 9, seed=4)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((tmp_path / "s").iterdir()):
            zf.write(f, f"STUDY/{f.name}")
    before = set(tmp_path.rglob("*"))
    series = st.read_study(archive).series[0]
    assert [s.position for s in series.slices] == positions
    img = load_rgb_input(st.expand(archive, slices="4")[0])
    assert mark_row(np.asarray(img)[..., 0]) == 8 * 4
    assert set(tmp_path.rglob("*")) == before, "nothing is extracted"

    from pydicom.fileset import FileSet

    fs = FileSet()
    for f in sorted((tmp_path / "s").iterdir()):
        fs.add(pydicom.dcmread(f))
    fs.write(tmp_path / "media")
    del fs  # pydicom stages a file set in a temporary folder of its own, removed when the set goes
    gc.collect()
    study = st.read_study(tmp_path / "media" / "DICOMDIR")
    assert study.kind == "DICOMDIR" and [s.position for s in study.series[0].slices] == positions
    img = load_rgb_input(st.expand(tmp_path / "media" / "DICOMDIR", slices="7")[0])
    assert mark_row(np.asarray(img)[..., 0]) == 8 * 7


def test_hostile_studies_are_one_line(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(HuatuoError, match="no DICOM images in this folder"):
        st.read_study(empty)
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(HuatuoError, match="not a readable zip"):
        st.read_study(bad_zip)
    fake_dir = tmp_path / "fake" / "DICOMDIR"
    fake_dir.parent.mkdir()
    fake_dir.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    with pytest.raises(HuatuoError, match="DICOMDIR"):
        st.read_study(fake_dir)
    # A zip member that inflates past the limit is skipped from its directory entry, never inflated.
    monkeypatch.setattr(st, "MAX_SLICE_BYTES", 1000)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * 128 + b"DICM" + b"\0" * 5000)
    with pytest.raises(HuatuoError, match=r"no DICOM images in this zip \(1 file"):
        st.read_study(bomb)
    monkeypatch.undo()
    # Too many files: refused from the listing.
    many = tmp_path / "many"
    many.mkdir()
    for k in range(12):
        (many / f"f{k}.dcm").write_bytes(b"x")
    with pytest.raises(HuatuoError, match="more than 10 files"):
        st.read_study(many, max_files=10)


def test_a_chosen_slice_with_broken_pixels_is_one_line_naming_it(tmp_path):
    write_series(tmp_path / "s", 6, seed=5, names="plain")
    victim = tmp_path / "s" / "IM0003"
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(victim)
    with pytest.raises(HuatuoError) as err:
        load_rgb_input(st.expand(tmp_path / "s", slices="3")[0])
    assert "IM0003" in str(err.value) and "truncated" in str(err.value) and "\n" not in str(err.value)
    # Other slices of the same series still read.
    load_rgb_input(st.expand(tmp_path / "s", slices="2")[0])


def test_headers_are_read_without_patient_fields(tmp_path, monkeypatch):
    write_series(tmp_path / "s", 3, phi=True)
    seen = []
    real = pydicom.dcmread

    def spy(*args, **kwargs):
        ds = real(*args, **kwargs)
        seen.append(ds)
        return ds

    monkeypatch.setattr(pydicom, "dcmread", spy)
    st.read_study(tmp_path / "s")
    assert seen and all(tag not in ds for ds in seen for tag in PHI), "only the grouping tags are parsed"


def test_the_picture_is_bounded_before_decoding(tmp_path):
    write_series(tmp_path / "s", 4, seed=6)
    with pytest.raises(HuatuoError, match="too large"):
        load_rgb_input(st.expand(tmp_path / "s", slices="1", max_pixels=100)[0])


def test_a_zip_member_over_the_limit_is_not_read(tmp_path, monkeypatch):
    write_series(tmp_path / "s", 2, seed=7, names="plain")
    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "s").iterdir()):
            zf.write(f, f.name)
    (picture,) = st.expand(archive, slices="0")
    monkeypatch.setattr(st, "MAX_SLICE_BYTES", 1000)  # the member is now over the limit when it is read
    with pytest.raises(HuatuoError, match="larger than"):
        load_rgb_input(picture)
