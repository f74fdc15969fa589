"""`huatuo-local eval` (issue 14): the release's evaluation file, scorer and table, run as a user would."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI, ROOT, run_cli
from PIL import Image
from tiny_models import TinySpec

SPEC = TinySpec(arch="qwen2", seed=14, tower="folder")
INSTRUCTION = "Answer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def model(converted):
    return converted(SPEC, "F32", "f32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic file in the release's exact format, every field variant in it."""
    folder = tmp_path_factory.mktemp("evaldata")
    (folder / "images").mkdir()
    for i in range(5):
        rng = np.random.default_rng(300 + i)
        Image.fromarray((rng.random((40 + 13 * i, 60, 3)) * 255).astype(np.uint8)).save(folder / f"images/{i}.png")
    records = [
        # options as a list; answer the 2nd option
        {"question": "Which organ is shown?", "options": ["liver", "lung", "heart"], "answer": "lung",
         "image": ["images/0.png"], "dataset": "VQA-RAD"},
        # options as their Python literal; a subset
        {"question": "Is there a fracture?", "options": "['yes', 'no']", "answer": "no",
         "image": ["images/1.png"], "dataset": "SLAKE", "subset": "bone"},
        # the same image again (its prefix is reused), another subset
        {"question": "What modality is this?", "options": ["CT", "MRI", "X-ray", "ultrasound"], "answer": "CT",
         "image": ["images/1.png"], "dataset": "SLAKE", "subset": "modality"},
        # `?` answer: always wrong
        {"question": "What stain is used?", "options": ["H&E", "PAS"], "answer": "?",
         "image": ["images/2.png"], "dataset": "PathVQA"},
        # open question: dropped
        {"question": "Describe the lesion.", "options": [], "answer": "a mass", "image": ["images/2.png"],
         "dataset": "PathVQA", "question_type": "open"},
        # empty options (as an empty string): dropped
        {"question": "Anything else?", "options": "", "answer": "no", "image": ["images/3.png"],
         "dataset": "PMC-VQA"},
        # two images
        {"question": "Which image shows the left side?", "options": ["first", "second"], "answer": "second",
         "image": ["images/3.png", "images/4.png"], "dataset": "PMC-VQA"},
        # an MMMU set: the model card's "MMMU Health & Medicine" column
        {"question": "Most likely diagnosis?", "options": ["A1", "B2", "C3", "D4", "E5"], "answer": "E5",
         "image": ["images/4.png"], "dataset": "MMMU-Medical-Clinical_Medicine", "subset": "val"},
        # a duplicate of the first record: its own number, scored again as the release does
        {"question": "Which organ is shown?", "options": ["liver", "lung", "heart"], "answer": "lung",
         "image": ["images/0.png"], "dataset": "VQA-RAD"},
        {"question": "Which sequence?", "options": ["T1", "T2", "FLAIR"], "answer": "FLAIR",
         "image": ["images/0.png"], "dataset": "OmniMedVQA", "subset": "MRI", "question_type": "closed"},
    ]
    path = folder / "medical_multimodel_evaluation_data.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


def evaluate(model, data, out, *args, timeout=600):
    return run_cli("eval", str(data), "--model", str(model.manifest_path), "--out", str(out), *args, timeout=timeout)


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# --- the release's rules ------------------------------------------------------------------


@pytest.mark.parametrize("output,letter", [
    ("B", "B"), ("The answer is C.", "C"), ("(d) effusion", "d"), ("A", "A"),
    # `A lesion`: the first `A` is guarded by (?![aA] ); the next stand-alone letter wins
    ("A lesion in B", "B"), ("A lesion", None),
    ("答案是D", "D"), ("**E**", "E"), ("#F", "F"), ("'G'", "G"), ('"H" is right', "H"),
    ("Option C: the lung", "C"), ("no letter here", None), ("", None),
    ("It is b, then C", "b"), ("the answer:\nK", "K"), ("L.", "L"), ("an X-ray", None),
    ("answer - N", "N"), ("O is wrong", None),
])
def test_letter_rule_is_the_releases(output, letter):
    from huatuo_local.models.evaluation import predicted_letter

    assert predicted_letter(output) == letter


def test_the_letter_rule_by_hand():
    """Independent of the pattern: the rule's documented behaviour, spelled out."""
    from huatuo_local.models.evaluation import Record, is_correct

    r = Record(0, "q", ("x", "y", "z", "w"), "w", (), "VQA-RAD")
    assert r.right_letter == "D"
    assert is_correct(r, "D") and is_correct(r, "The answer is D.")
    assert not is_correct(r, "(d) w")  # lower case never matches
    q = Record(1, "q", ("x", "y"), "?", (), "VQA-RAD")
    assert q.right_letter is None and not is_correct(q, "A") and not is_correct(q, "B")


def test_records_query_and_filtering(data):
    from huatuo_local.models.evaluation import build_query, load_records

    records, dropped = load_records(data)
    assert dropped == {"open": 1, "no options": 1}
    assert [r.number for r in records] == [0, 1, 2, 3, 6, 7, 8, 9]
    assert records[1].options == ("yes", "no") and records[1].right_letter == "B"
    assert records[1].group == "SLAKE_bone" and records[0].group == "VQA-RAD"
    assert records[3].right_letter is None
    assert build_query(records[2]) == ("What modality is this?\nA. CT\nB. MRI\nC. X-ray\nD. ultrasound\n"
                                       + INSTRUCTION)
    assert records[4].images == (data.parent / "images/3.png", data.parent / "images/4.png")


def test_summary_figures_and_intervals_by_hand():
    from huatuo_local.runtime.eval.report import markdown, mcnemar_p, summarize

    rows = [{"number": i, "dataset": "VQA-RAD", "group": "VQA-RAD", "column": "VQA-RAD", "correct": i < 3,
             "predicted": "A" if i != 9 else None} for i in range(10)]
    rows += [{"number": 10 + i, "dataset": "MMMU-Medical-X", "group": "MMMU-Medical-X_val",
              "column": "MMMU Health & Medicine", "correct": i == 0, "predicted": "B"} for i in range(4)]
    s = summarize(rows, 14, "huatuo-vision-7b")
    assert s["columns"]["VQA-RAD"]["accuracy"] == 30.0 and s["columns"]["VQA-RAD"]["model_card"] == 63.7
    # Wilson 95 % for 3/10: 10.8 %–60.3 %
    assert s["columns"]["VQA-RAD"]["ci95"] == [10.78, 60.32]
    assert s["columns"]["MMMU Health & Medicine"]["accuracy"] == 25.0
    assert s["overall"]["correct"] == 4 and s["overall"]["total"] == 14 and s["no_letter"] == 1
    md = markdown(s, "t")
    assert "| VQA-RAD | 10 | 30.0 (10.8–60.3) | 63.7 |" in md
    assert "| **overall (micro)** | 14 | 28.6" in md
    assert summarize(rows, 14, "huatuo-vision-34b:q4_k_m")["columns"]["VQA-RAD"]["model_card"] == 68.1
    # exact McNemar: 10 vs 2 discordant pairs, p = 2 * P(X <= 2 | n=12, 1/2) = 0.0386
    assert abs(mcnemar_p(10, 2) - 0.03857421875) < 1e-9 and mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0


# --- the command -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_run(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "greedy"
    proc = evaluate(model, data, out, "--greedy", "--parallel", "2")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_eval_answers_every_question_like_chat_and_counts_right(model, data, greedy_run):
    from huatuo_local.models.evaluation import build_query, load_records

    out, proc = greedy_run
    records = {r.number: r for r in load_records(data)[0]}
    rows = rows_of(out)
    assert sorted(r["number"] for r in rows) == sorted(records)  # each kept question once
    # Fidelity: each answer is what `chat` gives greedily for the same images and query (256 tokens).
    for n in (0, 2, 6):
        r = records[n]
        one = run_cli("chat", "--model", str(model.manifest_path), "--temperature", "0", "--no-prefix-cache",
                      "--max-tokens", "256", "--json", *map(str, r.images), "-p", build_query(r))
        assert one.returncode == 0, one.stderr
        row = next(x for x in rows if x["number"] == n)
        assert row["output"] == json.loads(one.stdout)["answer"]
        # The run's record: each question's pictures are the ones chat's record names, to the pixel.
        assert row["picture_sha256"] == [i["picture_sha256"] for i in json.loads(one.stdout)["record"]["images"]]
    # The table against a hand count from the answers, with the release's pattern written out here.
    pattern = re.compile(r"(is |是|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([abcdefghijklmnABCDEFGHIJKLMN])(\W|$)", re.S)
    hand: dict[str, list[int]] = {}
    for row in rows:
        rec = records[row["number"]]
        m = pattern.search(row["output"])
        right = "ABCDEFGHIJK"[rec.options.index(rec.answer)] if rec.answer in rec.options else None
        col = "MMMU Health & Medicine" if rec.dataset.startswith("MMMU") else rec.dataset
        hand.setdefault(col, []).append(int(m is not None and right is not None and m.group(2) == right))
    summary = json.loads((out / "results.json").read_text())["summary"]
    for col, marks in hand.items():
        assert summary["columns"][col]["correct"] == sum(marks) and summary["columns"][col]["total"] == len(marks)
        assert f"| {col} | {len(marks)} | {100 * sum(marks) / len(marks):.1f} (" in proc.stdout
    assert summary["no_letter"] == sum(1 for row in rows if not pattern.search(row["output"]))
    assert "VQA-RAD" in proc.stdout and "63.7" in proc.stdout  # the model card's figure beside ours
    saved = json.loads((out / "results.json").read_text())
    identity = saved["identity"]
    assert identity["llm_sha256"] == model.manifest.llm_sha256 and identity["settings"]["temperature"] == 0.0
    assert saved["software"]["llama_cpp_python"] and "not a medical device" in saved["notice"]
    assert (out / "results.jsonl").stat().st_mode & 0o077 == 0  # owner-only: answers about medical images


def test_sampled_runs_are_seeded_per_question_and_compare(model, data, tmp_path, greedy_run):
    a, b = tmp_path / "a", tmp_path / "b"
    assert evaluate(model, data, a, "--parallel", "2").returncode == 0
    assert evaluate(model, data, b, "--parallel", "1").returncode == 0
    ra = {r["number"]: r["output"] for r in rows_of(a)}
    rb = {r["number"]: r["output"] for r in rows_of(b)}
    assert ra == rb  # seed 42 per question: the same answers whatever the batching
    settings = json.loads((a / "run.json").read_text())["identity"]["settings"]
    assert settings == {"temperature": 0.2, "repetition_penalty": 1.2, "max_new_tokens": 256, "top_k": 50,
                        "top_p": 1.0, "seed": 42}
    proc = run_cli("eval", "compare", str(greedy_run[0]), str(a))
    assert proc.returncode == 0, proc.stderr
    assert "McNemar" in proc.stdout and re.search(r"\| overall \| 8 \|", proc.stdout), proc.stdout
    # A run folder is not reused for other settings.
    proc = evaluate(model, data, a, "--greedy")
    assert proc.returncode != 0 and "another settings" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_loses_nothing_and_a_rerun_continues(model, data, tmp_path, greedy_run):
    out = tmp_path / "resumed"
    cmd = [*CLI, "eval", str(data), "--model", str(model.manifest_path), "--out", str(out), "--greedy"]
    tmp = tmp_path / "tmp"  # the run's temporary folder: empty at the end
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command again to continue" in err and "Traceback" not in err
    done = rows_of(out)
    assert 2 <= len(done) < 8
    with open(results, "a") as f:  # a crash in the middle of a line
        f.write('{"number": 99, "outp')
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(done)} answered before)" in rerun.stderr
    rows = rows_of(out)
    assert sorted(r["number"] for r in rows) == [0, 1, 2, 3, 6, 7, 8, 9]  # none lost, none twice
    full = {r["number"]: r["output"] for r in rows_of(greedy_run[0])}
    assert {r["number"]: r["output"] for r in rows} == full
    assert not list(tmp.iterdir())  # nothing of the run (images, probes, partial files) left in it


def test_bad_input_is_one_line(model, tmp_path, data):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for target, words in ((tmp_path / "missing.json", "not found"), (bad, "not valid JSON")):
        proc = run_cli("eval", str(target), "--model", str(model.manifest_path), "--out", str(tmp_path / "o"))
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # Issue 36: the evaluation file went around the checked JSON reader (deep nesting, lone surrogates, any size,
    # a FIFO that hangs): each is one line naming the file, before the model loads.
    import hostile

    for name, path in hostile.hostile_json(tmp_path / "hostile", "x.png").items():
        proc = run_cli("eval", str(path), "--model", str(model.manifest_path), "--out", str(tmp_path / "o3"),
                       timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {path}"), (name, proc.stderr)
    proc = run_cli("eval", str(data), "--model", str(model.manifest_path), "--datasets", "NOPE",
                   "--out", str(tmp_path / "o2"))
    assert proc.returncode != 0 and "no dataset nope" in proc.stderr and "VQA-RAD" in proc.stderr
    proc = run_cli("eval", "--help")
    assert proc.returncode == 0 and "huatuo-local eval compare" in proc.stdout


def test_limit_and_datasets_select(model, data, tmp_path):
    out = tmp_path / "some"
    proc = evaluate(model, data, out, "--greedy", "--datasets", "VQA-RAD,MMMU", "--limit", "1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["number"] for r in rows_of(out)) == [0, 7]


@pytest.mark.skipif(sys.platform != "linux", reason="Ray's local cluster test runs on Linux")
def test_ray_workers_give_the_single_process_answers_and_survive_a_killed_worker(model, data, tmp_path,
                                                                                  greedy_run):
    """Two Ray actors on a private local cluster; one is killed mid-run: its questions are redone by a
    replacement, nothing lost or written twice, and the answers equal the single-process run."""
    import psutil

    out = tmp_path / "ray"
    cmd = [*CLI, "eval", str(data), "--model", str(model.manifest_path), "--out", str(out), "--greedy",
           "--ray", "local", "--workers", "2"]
    tmp = Path(tempfile.mkdtemp(prefix="r"))  # the run's temporary folder (Ray's files too): empty at the end;
    # short, for Ray's socket paths (tmp_path is too deep)
    env = dict(os.environ, RAY_DEDUP_LOGS="0", TMPDIR=str(tmp))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    killed = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and killed is None:
        try:  # the run's own actors only: never a process of anything else on this machine
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            break
        actors = [p for p in family if any("_Replica" in part for part in (p.cmdline() or []))]
        if len(actors) == 2 and (out / "results.jsonl").is_file() and (out / "results.jsonl").read_text():
            actors[0].kill()
            killed = actors[0].pid
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert killed is not None, "no worker was killed: the run ended too fast to test it"
    assert "a Ray worker died" in err
    rows = rows_of(out)
    assert sorted(r["number"] for r in rows) == [0, 1, 2, 3, 6, 7, 8, 9]
    full = {r["number"]: r["output"] for r in rows_of(greedy_run[0])}
    assert {r["number"]: r["output"] for r in rows} == full
    # The images travelled in memory, and the private cluster's files went with it: nothing left on disk.
    left = sorted(p.name for p in tmp.iterdir())
    tmp.rmdir() if not left else None
    assert not left, left


def test_a_progress_bar_with_rate_and_eta_on_a_terminal_only(model, data, tmp_path):
    import pexpect

    child = pexpect.spawn(CLI[0], [*CLI[1:], "eval", str(data), "--model", str(model.manifest_path), "--greedy",
                                   "--out", str(tmp_path / "tty")], cwd=str(ROOT), encoding="utf-8", timeout=300,
                          env=dict(os.environ, TERM="xterm-256color", COLUMNS="120"))
    child.expect(pexpect.EOF)
    child.close()
    screen = child.before
    assert child.exitstatus == 0, screen
    assert "answering" in screen and "8/8" in screen and "questions/min" in screen, screen
    assert re.search(r"\d+:\d\d:\d\d", screen)  # the time-remaining column
    piped = evaluate(model, data, tmp_path / "piped", "--greedy")
    assert piped.returncode == 0 and "questions/min" not in piped.stderr and "8/8" not in piped.stderr


def test_a_question_too_long_for_the_context_is_recorded_and_the_run_goes_on(model, data, tmp_path):
    records = json.loads(data.read_text())[:1]
    records.append({**records[0], "question": "lung " * 6000})  # far beyond the 4096 positions
    for r in records:
        r["image"] = [str(data.parent / p) for p in r["image"]]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records))
    proc = evaluate(model, path, tmp_path / "long", "--greedy")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = {r["number"]: r for r in rows_of(tmp_path / "long")}
    assert sorted(rows) == [0, 1] and "error" not in rows[0]
    assert "context" in rows[1]["error"] and rows[1]["correct"] is False
    assert json.loads((tmp_path / "long" / "results.json").read_text())["summary"]["errors"] == 1


def test_questions_whose_images_are_missing_are_left_out_and_reported(model, data, tmp_path):
    """Issue 22: every image missing gave exit 0 and a 0.0 % table beside the model card."""
    records = json.loads(data.read_text())[:4]
    for r in records:
        r["image"] = [str(tmp_path / "gone" / p) for p in r["image"]]
    path = tmp_path / "gone.json"
    path.write_text(json.dumps(records))
    proc = evaluate(model, path, tmp_path / "gone-run", "--greedy")
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: none of the 4 questions could be asked (record 0: ") and "no such file" in last
    summary = json.loads((tmp_path / "gone-run" / "results.json").read_text())["summary"]
    assert summary["errors"] == 4 and summary["asked"] == 0 and summary["no_letter"] == 0
    assert summary["overall"]["total"] == 0
    # One missing among others: left out of the accuracy, not counted wrong.
    mixed = json.loads(data.read_text())[:4]
    for r in mixed:
        r["image"] = [str(data.parent / p) for p in r["image"]]
    mixed[0]["image"] = [str(tmp_path / "gone.png")]
    path.write_text(json.dumps(mixed))
    proc = evaluate(model, path, tmp_path / "mixed-run", "--greedy")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "mixed-run" / "results.json").read_text())["summary"]
    assert summary["errors"] == 1 and summary["asked"] == 3 and summary["overall"]["total"] == 3


def test_ray_address_of_a_running_cluster(model, data, tmp_path, greedy_run):
    """`eval --ray HOST:PORT` joins a cluster started with `ray start` (issue 22: never tested): the same
    answers as one process."""
    import socket

    with socket.socket() as s:  # ray start takes a port number; this one is free now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    ray_dir = tempfile.mkdtemp(prefix="huatuo-ray-")  # short: Ray's socket paths must fit in 107 bytes
    # Ray turns 127.0.0.1 into this machine's network address unless told it is not a multi-machine
    # cluster; this test's traffic stays on loopback.
    # Clusters started with `ray start` require a token; this one is the test's own (never ~/.ray's).
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **token)
    # In a process group of its own: every process of this cluster (its daemons outlive `ray start`) is ended
    # by that group's id, its own; `ray stop` would end every Ray process of the user, a developer's own
    # cluster or another test run included.
    starter = subprocess.Popen([*ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                                f"--temp-dir={ray_dir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    _, started = starter.communicate(timeout=120)
    try:
        assert starter.returncode == 0, started[-2000:]
        out = tmp_path / "joined"
        proc = run_cli("eval", str(data), "--model", str(model.manifest_path), "--out", str(out), "--greedy",
                       "--ray", f"127.0.0.1:{port}", env=token, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert {r["number"]: r["output"] for r in rows_of(out)} == {
            r["number"]: r["output"] for r in rows_of(greedy_run[0])}
    finally:
        stop_group(starter.pid)
        shutil.rmtree(ray_dir, ignore_errors=True)


def stop_group(pgid: int) -> None:
    """End the processes of process group `pgid` (this test's cluster), waiting up to 15 s before SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


# --- option probabilities and calibration (issue 35) ------------------------------------------


def test_each_question_has_its_option_probabilities_as_the_model_gives_them(model, data, greedy_run, tmp_path):
    """Each row's option probabilities are the softmax, over the option letters' tokens, of the logits
    llama.cpp gives at the answer's first position (worked out here from a prefill of the same prompt); the
    run reports their accuracy and ECE beside the release's score, draws reliability.png, and `eval compare`
    shows both."""
    from huatuo_local.models.evaluation import build_query, load_records
    from huatuo_local.models.prompt import Turn

    from huatuo_local import HuatuoChatbot

    out, proc = greedy_run
    records = {r.number: r for r in load_records(data)[0]}
    rows = {r["number"]: r for r in rows_of(out)}
    asked = [r for r in rows.values() if not r.get("error")]
    assert asked and all(set(r["option_probs"]) == set("ABCDEFGHIJK"[: len(records[r["number"]].options)])
                         and abs(sum(r["option_probs"].values()) - 1) < 1e-4 for r in asked)
    with HuatuoChatbot(model.manifest_path, temperature=0, prefix_cache=False) as bot:
        for n in (0, 2):
            r = records[n]
            s = bot.session
            images = s.prepare_images(list(r.images))
            logits = s.evaluate(s.items_for([Turn(build_query(r), len(images))], images)).astype(np.float64)
            ids = [bot.engine.tokenizer.tokenize(letter)[0] for letter in "ABCDEFGHIJK"[: len(r.options)]]
            scores = logits[ids] - logits[ids].max()
            want = np.exp(scores) / np.exp(scores).sum()
            got = [rows[n]["option_probs"][letter] for letter in "ABCDEFGHIJK"[: len(r.options)]]
            assert np.allclose(got, want, atol=1e-4), (got, want)
    summary = json.loads((out / "results.json").read_text())["summary"]["options"]
    picks = [(max(r["option_probs"].values()), max(r["option_probs"], key=r["option_probs"].get) == r["right"])
             for r in asked if r["right"] is not None]
    assert summary["questions"] == len(picks) and summary["correct"] == sum(ok for _, ok in picks)
    assert "| the most likely letter |" in (out / "results.md").read_text()
    png = out / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_mode & 0o077 == 0
    assert Image.open(png).size == (560, 480)
    compared = run_cli("eval", "compare", str(out), str(out))
    assert compared.returncode == 0 and "| by the option letters' probabilities |" in compared.stdout


def test_expected_calibration_error_by_hand():
    from huatuo_local.runtime.eval.calibration import expected_calibration_error, option_probabilities

    # Two bins used: 0.95 (2 questions, 1 right: |0.5 - 0.95|) and 0.55 (2 questions, 2 right: |1 - 0.55|).
    pairs = [(0.95, True), (0.95, False), (0.55, True), (0.55, True)]
    assert expected_calibration_error(pairs) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert expected_calibration_error([(0.8, True)] * 4 + [(0.8, False)]) == pytest.approx(0.0)
    assert option_probabilities([0.0, float("-inf"), np.log(3)]) == pytest.approx([0.25, 0.0, 0.75])
