"""Calibration conversations: what an importance matrix is computed from, and what quality is checked on.

The bundled set uses real medical images that ship with pydicom as public test data (CT, MR,
ultrasound, nuclear medicine; several are NEMA's public WG04 sample images; distributed under
pydicom's MIT licence, a few under GDCM's BSD licence, as pydicom's test_files/README.txt states).
They are read from the installed package's own folder, never downloaded or copied. Each comes
with questions in the release's two styles: an open question with an answer, and a multiple-choice
query exactly as the release's evaluation asks it. A held-out set (other images, other questions) is
for measuring a quant, never for computing its matrix. `--calibration FOLDER|JSON` gives the user's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.evaluation import LETTERS, Record, build_query, load_records
from huatuo_local.models.jsonfile import read_json

# A calibration set is tens to thousands of conversations: 16 MB of JSON holds far more than any.
MAX_CALIBRATION_BYTES = 16 * 1024 * 1024
CALIBRATION_FIX = 'give a JSON list of {"image": PATH, "question": ..., "answer": ...}, or a folder of images'
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
     "paraspinal muscles, shown in a soft-tissue window.",
     "Which imaging modality was used?", ["MRI", "CT", "Ultrasound", "X-ray"], 1),
    ("693_J2KI.dcm", "Describe the findings.",
     "An axial CT image of the head. In this window the skull is bright and the brain is a uniform grey; "
     "no focal lesion can be assessed.",
     "In which plane is this image?", ["Axial", "Sagittal", "Coronal"], 0),
    ("MR_small.dcm", "What kind of image is this?",
     "A small magnetic resonance image in grayscale, a cropped section with bright fluid and darker soft "
     "tissue.", "Which imaging modality was used?", ["CT", "PET", "MRI", "Ultrasound"], 2),
    ("examples_overlay.dcm", "Is there anything abnormal?",
     "This axial MR image of the upper abdomen shows the liver, both kidneys and the spine; there is a "
     "rounded area of different signal in the liver that should be characterised further.",
     "Which region of the body is shown?", ["Head", "Chest", "Abdomen", "Pelvis"], 2),
    ("examples_rgb_color.dcm", "What does this ultrasound image show?",
     "A colour Doppler ultrasound of a lymph node; flow is shown in red and orange within the node.",
     "What does the colour in this image encode?", ["Tissue density", "Blood flow", "Temperature"], 1),
    ("examples_palette.dcm", "Describe this image.",
     "An obstetric ultrasound image with the sector-shaped field of view of a curved transducer; little "
     "tissue is seen within the sector.", "Which imaging modality was used?", ["Ultrasound", "CT", "MRI", "X-ray"],
     0),
    ("JPEG2000.dcm", "What type of study is this?",
     "A nuclear medicine image: a planar whole-body scintigraphy showing the distribution of a tracer.",
     "Which imaging modality was used?", ["Nuclear medicine", "MRI", "CT", "Endoscopy"], 0),
]
# Other pictures (pydicom's files hold a few images twice under other encodings: none of those here).
_HELD_OUT = [
    ("J2K_pixelrep_mismatch.dcm", "What does this image show?"),
    ("J2K_pixelrep_mismatch.dcm", "Is the skull intact in this image?"),
    ("examples_ybr_color.dcm", "Describe the findings."),
    ("examples_ybr_color.dcm", "Which heart chambers can be seen?"),
    ("liver_1frame.dcm", "What does this image show?"),
    ("liver_1frame.dcm", "Which organ has been outlined?"),
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
    """The calibration set: each image with an open question and a multiple-choice query (14 in all)."""
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
    """The dataset label an importance matrix records: `name (14 image+text)`."""
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
        # Regular files only: a FIFO named scan.png would block the image loader forever.
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise HuatuoError(f"{source}: no images in it ({', '.join(sorted(IMAGE_SUFFIXES))})")
        # No answers: the bundled ones describe the bundled images. The model answers itself
        # (imatrix.ANSWER_TOKENS), so the matrix also sees the positions of its own writing.
        questions = [q for _, q, *_ in _CALIBRATION]
        return [Conversation(img, questions[i % len(questions)], "") for i, img in enumerate(images)]
    if not source.exists():
        raise HuatuoError(f"--calibration {source}: no such file or folder")
    data = read_json(source, CALIBRATION_FIX, max_bytes=MAX_CALIBRATION_BYTES, error=HuatuoError, text_only=True)
    if isinstance(data, list) and data and all(isinstance(r, dict) and "options" in r for r in data):
        records, _ = load_records(source)  # the release's evaluation format: its query, its right option
        return _checked(source, [Conversation(Path(r.images[0]) if r.images else None, build_query(r),
                                              r.right_letter or "") for r in records])
    if not isinstance(data, list) or not all(isinstance(r, dict) and isinstance(r.get("question"), str)
                                             for r in data):
        raise HuatuoError(f"{source}: give a list of {{\"image\": PATH, \"question\": ..., \"answer\": ...}}")
    out = []
    for number, r in enumerate(data):
        image = r.get("image")
        if image is not None and not isinstance(image, str):  # a number or a list was dropped silently
            raise HuatuoError(f"{source}: conversation {number}: \"image\" must be one path (a string), relative to "
                              "the JSON file's folder")
        answer = r.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise HuatuoError(f"{source}: conversation {number}: \"answer\" must be text")
        path = (source.parent / image).expanduser() if image else None
        out.append(Conversation(path, r["question"], answer or ""))
    return _checked(source, out)


def _checked(source: Path, conversations: list[Conversation]) -> list[Conversation]:
    """Refuse an empty set or a missing image now, in one line, rather than after the model loaded."""
    if not conversations:
        raise HuatuoError(f"{source}: no conversations in it")
    for c in conversations:
        if c.image is not None and not c.image.is_file():
            what = "not a regular file" if c.image.exists() else "not found"
            raise HuatuoError(f"{source}: image {c.image} {what}; fix the path (relative to the JSON file's folder)")
    return conversations
