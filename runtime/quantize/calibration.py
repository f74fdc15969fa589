"""Calibration conversations: what an importance matrix is computed from, and what quality is checked on.

The bundled set uses real medical images that ship with pydicom as public test data (CT, MR,
ultrasound, nuclear medicine; read from the installed package's own folder, never downloaded), each
with questions in the release's two styles: an open question with an answer, and a multiple-choice
query exactly as the release's evaluation asks it. A held-out set (other images, other questions) is
for measuring a quant, never for computing its matrix. `--calibration FOLDER|JSON` gives the user's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.evaluation import LETTERS, Record, build_query, load_records

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm", ".dicom"}


@dataclass(frozen=True)
class Conversation:
    image: Path | None  # None: text only
    question: str
    answer: str


def _choice(question: str, options: list[str], right: int) -> tuple[str, str]:
    """A multiple-choice query as the release's evaluation writes it, and its answer letter."""
    record = Record(0, question, tuple(options), options[right], (), "calibration", "")
    return build_query(record), LETTERS[right]


# (pydicom test file, open question, its answer, multiple-choice question, options, right option)
_CALIBRATION = [
    ("CT_small.dcm", "What does this image show?",
     "An axial CT slice at the level of a thoracic vertebra: the vertebral body, the spinal canal and the "
     "paraspinal muscles, with a round vessel beside the spine, most likely the descending aorta.",
     "Which imaging modality was used?", ["MRI", "CT", "Ultrasound", "X-ray"], 1),
    ("693_J2KI.dcm", "Describe the findings.",
     "An axial CT image. The soft tissues and the bone are shown in one window; no focal lesion is seen.",
     "In which plane is this image?", ["Axial", "Sagittal", "Coronal"], 0),
    ("MR_small.dcm", "What kind of image is this?",
     "A small magnetic resonance image of the head in grayscale; the contrast is that of a T1-weighted "
     "sequence.", "Which imaging modality was used?", ["CT", "PET", "MRI", "Ultrasound"], 2),
    ("examples_overlay.dcm", "Is there anything abnormal?",
     "This MR slice shows no clear abnormality; the signal is homogeneous and the structures are symmetric.",
     "Which organ is mainly shown?", ["Brain", "Liver", "Kidney", "Heart"], 0),
    ("examples_rgb_color.dcm", "What does this ultrasound image show?",
     "A colour ultrasound image with a Doppler box; flow is shown in red and blue within the vessel.",
     "What does the colour in this image encode?", ["Tissue density", "Blood flow", "Temperature"], 1),
    ("examples_palette.dcm", "Describe this image.",
     "An ultrasound image displayed through a colour palette, with the sector-shaped field of view typical "
     "of a curved transducer.", "Which imaging modality was used?", ["Ultrasound", "CT", "MRI", "X-ray"], 0),
    ("examples_jpeg2k.dcm", "What is seen in this image?",
     "An ultrasound frame with the scanner's annotations around a fan-shaped view of soft tissue.",
     "Is this a cross-sectional CT image?", ["Yes", "No"], 1),
    ("JPEG2000.dcm", "What type of study is this?",
     "A nuclear medicine image: a planar scintigraphy acquisition showing the distribution of a tracer.",
     "Which imaging modality was used?", ["Nuclear medicine", "MRI", "CT", "Endoscopy"], 0),
]
_HELD_OUT = [
    ("J2K_pixelrep_mismatch.dcm", "What does this image show?"),
    ("image_dfl.dcm", "Describe the findings."),
    ("SC_rgb_jpeg.dcm", "What can be seen in this picture?"),
    ("examples_ybr_color.dcm", "Is there anything abnormal in this ultrasound image?"),
    ("JPGExtended.dcm", "What kind of study is this?"),
    ("MR_small_RLE.dcm", "Which modality is this, and what does it show?"),
]


def _pydicom_file(name: str) -> Path:
    """A test file that ships inside the installed pydicom (never the network: pydicom's own helper
    downloads what is not bundled)."""
    import pydicom.data

    path = Path(pydicom.data.__file__).parent / "test_files" / name
    if not path.is_file():
        raise HuatuoError(f"{name}: not among the installed pydicom's test files; reinstall pydicom or give "
                          "--calibration FOLDER")
    return path


def bundled(text_only: bool = False) -> list[Conversation]:
    """The calibration set: each image with an open question and a multiple-choice query (16 in all)."""
    out = []
    for name, question, answer, choice, options, right in _CALIBRATION:
        image = None if text_only else _pydicom_file(name)
        query, letter = _choice(choice, options, right)
        out += [Conversation(image, question, answer), Conversation(image, query, letter)]
    return out


def held_out() -> list[Conversation]:
    """Prompts a matrix never saw: for measuring a quant's quality (no answer: the model gives it)."""
    return [Conversation(_pydicom_file(name), question, "") for name, question in _HELD_OUT]


def describe(conversations: list[Conversation], name: str) -> str:
    """The dataset label an importance matrix records: `name (16 image+text)`."""
    with_image = sum(c.image is not None for c in conversations)
    if with_image == len(conversations):
        return f"{name} ({len(conversations)} image+text)"
    if with_image == 0:
        return f"{name} ({len(conversations)} text-only)"
    return f"{name} ({with_image} image+text, {len(conversations) - with_image} text-only)"


BUNDLED_NAME = "huatuo-local bundled calibration"


def from_user(source: Path) -> list[Conversation]:
    """The user's calibration: a folder of images (each asked one of the bundled open questions, the
    model writing the answer), a JSON list of {"image": path, "question": ..., "answer": ...} (answer
    optional), or the release's evaluation file."""
    source = Path(source).expanduser()
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise HuatuoError(f"{source}: no images in it ({', '.join(sorted(IMAGE_SUFFIXES))})")
        # No answers: the bundled ones describe the bundled images. The model answers itself
        # (imatrix.ANSWER_TOKENS), so the matrix also sees the positions of its own writing.
        questions = [q for _, q, *_ in _CALIBRATION]
        return [Conversation(img, questions[i % len(questions)], "") for i, img in enumerate(images)]
    if not source.is_file():
        raise HuatuoError(f"--calibration {source}: no such file or folder")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HuatuoError(f"{source}: not a JSON file ({exc})") from None
    if isinstance(data, list) and data and all(isinstance(r, dict) and "options" in r for r in data):
        records, _ = load_records(source)  # the release's evaluation format: its query, its right option
        return _checked(source, [Conversation(Path(r.images[0]) if r.images else None, build_query(r),
                                              r.right_letter or "") for r in records])
    if not isinstance(data, list) or not all(isinstance(r, dict) and isinstance(r.get("question"), str)
                                             for r in data):
        raise HuatuoError(f"{source}: give a list of {{\"image\": PATH, \"question\": ..., \"answer\": ...}}")
    out = []
    for r in data:
        image = r.get("image")
        path = (source.parent / image).expanduser() if isinstance(image, str) else None
        out.append(Conversation(path, r["question"], str(r.get("answer") or "")))
    return _checked(source, out)


def _checked(source: Path, conversations: list[Conversation]) -> list[Conversation]:
    """Refuse an empty set or a missing image now, in one line, rather than after the model loaded."""
    if not conversations:
        raise HuatuoError(f"{source}: no conversations in it")
    for c in conversations:
        if c.image is not None and not c.image.is_file():
            raise HuatuoError(f"{source}: image {c.image} not found; fix the path (relative to the JSON file's folder)")
    return conversations
