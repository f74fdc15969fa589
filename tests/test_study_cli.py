"""DICOM studies through `chat` as a user runs it, each answer's record, and no patient identifier in anything
the product writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from dicom_series import PHI, write_series
from test_chat_cli import SPEC, leave, repl


@pytest.fixture(scope="module")
def model(converted):
    return converted(SPEC, "F32", "f32")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "CT"
    positions = write_series(folder, 12, seed=11)
    return folder, positions


def chat_json(model, *args, env=None):
    proc = run_cli("chat", "--model", str(model.manifest_path), "--temperature", "0", "--max-tokens", "8",
                   "--no-prefix-cache", "--json", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_study_slice_answers_as_the_slice_file_alone_and_the_record_says_which(model, study):
    folder, positions = study
    from huatuo_local.runtime.images.study import read_study

    series = read_study(folder).series[0]
    via_study = chat_json(model, str(folder), "--slices", "5", "--window", "40,400", "-p", "What is shown?")
    via_file = chat_json(model, str(folder / series.slices[5].name), "--window", "40,400", "-p", "What is shown?")
    assert via_study["answer"] == via_file["answer"]
    a, b = via_study["record"], via_file["record"]
    assert a["images"][0]["picture_sha256"] == b["images"][0]["picture_sha256"], "the same pixels reached the model"
    image = a["images"][0]
    assert image["study"] == str(folder) and image["slices"] == [5] and image["series_number"] == 3
    assert image["files"] == [series.slices[5].name] and image["positions_mm"] == [positions[5]]
    assert image["window"] == {"center": 40.0, "width": 400.0, "source": "chosen"}
    assert image["series_uid_sha256"] == series.uid_digest and series.uid not in json.dumps(a)
    manifest = json.loads(Path(model.manifest_path).read_text())
    assert a["llm_sha256"] == manifest["llm_sha256"] and a["mmproj_sha256"] == manifest["mmproj_sha256"]
    assert a["quant"] == "F32" and a["engine"]["llama_cpp_python"] and len(a["engine"]["build_sha256"]) == 64
    assert a["sampling"]["temperature"] == 0 and a["sampling"]["max_new_tokens"] == 8
    assert isinstance(a["seed"], int) and a["turn"] == 1 and "not a medical device" in a["notice"]
    assert b["images"][0]["file"] == str(folder / series.slices[5].name)


def test_a_montage_is_one_picture_of_the_chosen_slices(model, study):
    folder, positions = study
    out = chat_json(model, str(folder), "--montage", "2x2", "-p", "Describe.")
    (image,) = out["record"]["images"]
    assert image["montage"] == "2x2" and len(image["slices"]) == 4 and image["slices"] == sorted(image["slices"])
    assert image["positions_mm"] == [positions[k] for k in image["slices"]]


def test_study_mistakes_are_one_line_before_the_model_loads(model, study, tmp_path):
    folder, _ = study
    write_series(tmp_path / "mixed", 3, series_number=7, seed=12)
    write_series(tmp_path / "mixed", 4, series_number=8, seed=13)
    for args, needle in [([str(tmp_path / "mixed")], "choose one with --series N"),
                         ([str(folder), "--slices", "0:12"], "tile them with --montage"),
                         ([str(folder), "--montage", "9x9"], "rows and columns from 1 to 6"),
                         ([str(folder), "--slices", "99"], "out of range")]:
        proc = run_cli("chat", "--model", "no-such-model", *args, "-p", "q")
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_the_repl_adds_a_study_and_saves_each_answer_with_its_record(model, study, tmp_path):
    folder, _ = study
    child = repl(model.manifest_path, "--no-prefix-cache", "--max-tokens", "6")
    child.expect("not a medical device")
    child.expect(">>> ")
    child.sendline(f"/image {folder} --slices auto:2")
    child.expect(r"image added: [^\r\n]* slice\(s\) \d+")
    child.expect(r"image added: [^\r\n]* slice\(s\) \d+")
    child.expect(">>> ")
    child.sendline("What is this?")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 't.json'}")
    child.expect("saved")
    child.sendline(f"/save {tmp_path / 't.md'}")
    child.expect("saved")
    child.expect(">>> ")
    leave(child)
    saved = json.loads((tmp_path / "t.json").read_text())
    (turn,) = saved["turns"]
    assert len(turn["record"]["images"]) == 2 and all(i["study"] == str(folder) for i in turn["record"]["images"])
    assert "not a medical device" in saved["notice"]
    md = (tmp_path / "t.md").read_text()
    assert "not a medical device" in md and turn["record"]["images"][0]["picture_sha256"][:16] in md
    assert oct((tmp_path / "t.json").stat().st_mode & 0o777) == "0o600"


def test_no_patient_identifier_in_anything_the_product_writes(model, tmp_path):
    """A study whose files carry a patient's name, ID, birth date, address and accession number: answers,
    records, transcripts, caches, eval runs, logs and every file the product writes hold none of them."""
    folder = tmp_path / "Study"
    write_series(folder, 6, phi=True, seed=21)
    home = tmp_path / "home"
    env = {"HUATUO_LOCAL_HOME": str(home)}
    outputs = []
    for args in (["--slices", "auto:2"], ["--montage", "2x2"]):
        proc = run_cli("chat", "--model", str(model.manifest_path), "--temperature", "0", "--max-tokens", "6",
                       "--json", str(folder), *args, "-p", "Who is the patient?", env=env)  # prefix cache on
        assert proc.returncode == 0, proc.stderr
        outputs += [proc.stdout, proc.stderr]
    (tmp_path / "out").mkdir()
    child = repl(model.manifest_path, "--max-tokens", "4", env=env)
    child.expect(">>> ")
    child.sendline(f"/image {folder} --slices 3")
    child.expect(">>> ")
    child.sendline("Name the patient.")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 'out' / 'chat.json'}")
    child.expect("saved")
    child.sendline(f"/save {tmp_path / 'out' / 'chat.md'}")
    child.expect("saved")
    child.expect(">>> ")
    outputs.append(child.before or "")
    leave(child)
    # An evaluation whose images are the patient's slices: its run folder holds nothing of the patient either.
    dataset = tmp_path / "evaldata" / "data.json"
    dataset.parent.mkdir()
    slices = sorted(folder.iterdir())
    dataset.write_text(json.dumps([{"question": "Which organ?", "options": ["lung", "liver"], "answer": "lung",
                                    "image": [str(slices[k])], "dataset": "VQA-RAD"} for k in range(2)]))
    proc = run_cli("eval", str(dataset), "--model", str(model.manifest_path), "--out", str(tmp_path / "out" / "eval"),
                   env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    outputs += [proc.stdout, proc.stderr]
    assert (tmp_path / "out" / "eval" / "results.jsonl").is_file()
    written = [p for p in [*home.rglob("*"), *(tmp_path / "out").rglob("*")] if p.is_file()]
    assert any(home in p.parents for p in written), "the runs wrote their caches (the prefix cache was on)"
    blobs = [p.read_bytes() for p in written] + [o.encode() for o in outputs]
    for value in PHI.values():
        for variant in {value, value.replace("^", " "), value.split("^")[0]}:
            hits = [str(p) for p, b in zip([*written, *["output"] * len(outputs)], blobs) if variant.encode() in b]
            assert not hits, f"{variant!r} written to {hits}"
    assert os.path.exists(tmp_path / "out" / "chat.json")


def test_the_api_takes_a_zipped_study_and_answers_as_chat_with_its_record(model, study, tmp_path):
    """A zipped study sent through the official client (data: URI, and file:// under --allow-files): the same
    greedy answer as `chat` on the same study and montage, the record in `huatuo_record`, and
    `system_fingerprint` set; nothing of the patient in the answer or the server's log."""
    import zipfile

    from test_serve import KEY, ask, client, data_uri, server, user

    folder = tmp_path / "phi"
    write_series(folder, 8, phi=True, seed=31)
    archive = tmp_path / "allowed" / "study.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"DICOM/{f.name}")
    want = chat_json(model, str(archive), "--montage", "2x2", "--window", "lung", "-p", "Describe.")
    with server(str(model.manifest_path), tmp_path, "--api-key", KEY, "--allow-files",
                str(archive.parent)) as (url, _, log):
        c = client(url)
        for uri in (data_uri(archive, "application/zip"), archive.as_uri()):
            got = ask(c, [user("Describe.", uri, montage="2x2", window="lung")], max_tokens=8)
            assert got.choices[0].message.content == want["answer"]
            assert got.system_fingerprint and got.system_fingerprint.startswith("fp_")
            record = got.model_extra["huatuo_record"]
            assert record["images"][0]["picture_sha256"] == want["record"]["images"][0]["picture_sha256"]
            assert record["images"][0]["montage"] == "2x2" and record["llm_sha256"] == want["record"]["llm_sha256"]
        # Streaming: the record comes with the last chunk.
        chunks = list(ask(c, [user("Describe.", archive.as_uri(), montage="2x2", window="lung")], stream=True,
                          max_tokens=8))
        last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
        assert last.model_extra["huatuo_record"]["images"][0]["montage"] == "2x2"
        # A study folder by file://: read through descriptors (a link inside is skipped, never followed).
        inside = archive.parent / "folder"
        inside.mkdir()
        for f in sorted(folder.iterdir()):
            (inside / f.name).write_bytes(f.read_bytes())
        (inside / "escape.dcm").symlink_to(tmp_path / "outside.dcm")
        (tmp_path / "outside.dcm").write_bytes((folder / sorted(p.name for p in folder.iterdir())[0]).read_bytes())
        got = ask(c, [user("Describe.", inside.as_uri(), montage="2x2", window="lung")], max_tokens=8)
        assert got.choices[0].message.content == want["answer"]
        assert got.model_extra["huatuo_record"]["images"][0]["series_slices"] == 8, "the link was not followed"
        # Several slices without a montage are not one picture: a 400 saying what to do.
        import openai

        with pytest.raises(openai.BadRequestError) as err:
            ask(c, [user("Describe.", archive.as_uri(), slices="auto:3")])
        assert "montage" in err.value.body["message"] and "--" not in err.value.body["message"]
        log_text = log.read_text()
    for value in PHI.values():
        assert value not in log_text and value not in json.dumps(want)
