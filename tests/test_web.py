"""The page at / in a real browser: headless Chromium (Debian's, installed by scripts/bootstrap.py)
driven by Playwright, against a real server process with a tiny model."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image
from pydicom.data import get_testdata_file
from test_serve import BACKENDS, KEY, backend_params, client, data_uri, server
from tiny_models import TinySpec

SPEC = TinySpec(arch="qwen2", seed=8, tower="folder")


def wait_js(page, expression: str, timeout: float = 30_000) -> None:
    """Wait until `expression` is true in the page. Polled from here: Playwright's wait_for_function
    evaluates strings inside the page, which the page's Content-Security-Policy rightly forbids."""
    deadline = time.time() + timeout / 1000
    while not page.evaluate(expression):
        if time.time() >= deadline:  # say where the page is instead, and what it shows as an error
            where = page.evaluate("[document.querySelector('#chat')?.dataset.state, "
                                  "document.querySelector('#error')?.textContent]")
            raise AssertionError(f"timed out waiting for {expression}; the page's state and error: {where}")
        time.sleep(0.05)


def pixels_of(uri_or_path) -> np.ndarray:
    if isinstance(uri_or_path, str) and uri_or_path.startswith("data:"):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri_or_path.split(",", 1)[1]))).convert("RGB"))
    return np.asarray(Image.open(uri_or_path).convert("RGB"))


def preview_cli(path, tmp_path, *args) -> np.ndarray:
    out = tmp_path / f"preview-{abs(hash((str(path), args)))}.png"
    proc = run_cli("preview", str(path), "-o", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    return pixels_of(out)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is missing: python3 scripts/bootstrap.py installs it"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def new_page(browser):
    """browser.new_page for one test: its pages (and their renderer processes) are closed when it ends."""
    opened = []

    def make(**kw):
        opened.append(browser.new_context(**kw))
        return opened[-1].new_page()

    yield make
    for context in opened:
        context.close()


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("web") / "chest.png"
    shutil.copy(ROOT / "examples" / "chest_ct.png", path)
    return path


def drop_file(page, path, mime: str) -> None:
    """A real drop event on the drop zone, carrying the file as a browser would."""
    page.evaluate("""([name, b64, mime]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: mime}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", [path.name, base64.b64encode(path.read_bytes()).decode(), mime])


def wait_state(page, state: str, timeout: float = 60_000) -> None:
    wait_js(page, f"document.querySelector('#chat').dataset.state === '{state}'", timeout=timeout)


def ask_on_page(page, question: str) -> None:
    page.fill("#question", question)
    page.press("#question", "Enter")


def test_the_page_end_to_end(new_page, converted, png, tmp_path):
    from pathlib import Path

    model = converted(SPEC, "F32", "f32")
    ct = Path(get_testdata_file("CT_small.dcm"))
    # 8192 positions per conversation: the stopped answer below may run to its full 3000 tokens before the
    # stop lands (a slow browser), and the follow-up after it (about 2700 positions before it) must still fit.
    with server(str(model.manifest_path), tmp_path, "--parallel", "2", "--ctx", "8192",
                env={"HUATUO_LOCAL_API_KEY": KEY}) as (url, _, _):
        page = new_page(viewport={"width": 1280, "height": 800})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        # The page lives under a strict Content-Security-Policy: any violation is reported here.
        page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
        # Stop aborts its request (net::ERR_ABORTED): that one is meant; any other failure is not.
        page.on("requestfailed", lambda r: None if r.failure == "net::ERR_ABORTED"
                else problems.append(f"failed {r.url} {r.failure}"))
        page.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith(("data:", "blob:"))
                else problems.append(f"offline page asked for {r.url}"))
        page.goto(url + "/")
        # The key is asked once and kept for the tab only; a wrong one is said, not left at "loading…".
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#key", "not-the-key")
        page.press("#key", "Enter")
        wait_js(page, "document.querySelector('#error').textContent.includes('API key was not accepted')")
        assert page.inner_text("#model") == "API key needed"
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#key", KEY)
        page.press("#key", "Enter")
        wait_js(page, "document.querySelector('#model').textContent === 'tiny:f32'")
        assert page.evaluate("sessionStorage.getItem('huatuo-key')") == KEY
        assert page.evaluate("localStorage.length") == 0

        # Drop a PNG, pick CT_small: each shows exactly what `preview` computes.
        drop_file(page, png, "image/png")
        page.set_input_files("#file", str(ct))
        wait_js(page, "document.querySelectorAll('#pending img[data-digest]').length === 2")
        cards = page.locator("#pending .card")
        assert np.array_equal(pixels_of(cards.nth(0).locator("img").get_attribute("src")),
                              preview_cli(png, tmp_path))
        ct_img = cards.nth(1).locator("img")
        assert cards.nth(0).locator(".dicom").is_hidden() and cards.nth(1).locator(".dicom").is_visible()
        # Centre and width show the window in use: CT_small names none, so the 0.5-99.5 percentile range of
        # its Hounsfield values; then the preset's.
        import pydicom
        from pydicom.pixels import apply_modality_lut

        ds = pydicom.dcmread(ct)
        assert "WindowCenter" not in ds
        lo, hi = np.percentile(apply_modality_lut(ds.pixel_array, ds).astype(np.float64), [0.5, 99.5])
        center, width = cards.nth(1).locator(".center"), cards.nth(1).locator(".width")
        assert (float(center.input_value()), float(width.input_value())) == (round((lo + hi) / 2, 1),
                                                                              round(hi - lo, 1))
        assert "0.5-99.5 % of the values" in cards.nth(1).locator(".window-note").inner_text()
        default = pixels_of(ct_img.get_attribute("src"))
        assert np.array_equal(default, preview_cli(ct, tmp_path))
        before = ct_img.get_attribute("data-digest")
        cards.nth(1).locator(".window").select_option("lung")
        wait_js(page, f"document.querySelectorAll('#pending img')[1].dataset.digest !== '{before}'")
        lung = pixels_of(ct_img.get_attribute("src"))
        assert not np.array_equal(lung, default) and np.array_equal(lung, preview_cli(ct, tmp_path, "--window", "lung"))
        assert (float(center.input_value()), float(width.input_value())) == (-600.0, 1500.0)
        assert "lung preset" in cards.nth(1).locator(".window-note").inner_text()
        cards.nth(1).locator(".window").select_option("custom")
        cards.nth(1).locator(".center").fill("-100")
        cards.nth(1).locator(".width").fill("900")
        cards.nth(1).locator(".width").press("Tab")
        custom = preview_cli(ct, tmp_path, "--window", "-100,900")
        # The page shows each picture's digest (SHA-256 of its pixels): wait for exactly `preview`'s.
        wait_js(page, f"document.querySelectorAll('#pending img')[1].dataset.digest === "
                               f"'{hashlib.sha256(custom.tobytes()).hexdigest()}'")
        assert np.array_equal(pixels_of(ct_img.get_attribute("src")), custom)
        cards.nth(1).locator(".window").select_option("lung")
        wait_js(page, "document.querySelectorAll('#pending img[aria-busy]').length === 0")
        if os.environ.get("HUATUO_LOCAL_SCREENSHOT"):  # the README's picture: a CT in the lung window
            page.fill("#question", "这是什么器官？ Describe the findings in the lung window.")
            page.screenshot(path=os.environ["HUATUO_LOCAL_SCREENSHOT"], full_page=True)

        # Ask greedily; the streamed answer equals the API's.
        page.click("#ask summary")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "16")
        page.fill("#question", "Line one")
        page.press("#question", "Shift+Enter")  # a new line, not a send
        assert page.input_value("#question") == "Line one\n" and page.locator("#turns li").count() == 0
        q1 = "这是什么器官？ Describe the findings."
        ask_on_page(page, q1)
        wait_state(page, "done")
        images = [{"type": "image_url", "image_url": {"url": data_uri(png)}},
                  {"type": "image_url", "image_url": {"url": data_uri(ct, "application/dicom"), "window": "lung"}}]
        first_msg = {"role": "user", "content": [*images, {"type": "text", "text": q1}]}
        c = client(url)
        want1 = c.chat.completions.create(model="tiny", messages=[first_msg], temperature=0,
                                          max_tokens=16).choices[0].message.content
        answers = page.locator("#turns li .answer")
        assert answers.nth(0).inner_text() == want1
        # Each answer has a copy button that puts exactly its text on the clipboard.
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        page.locator("#turns li button.copy").nth(0).click()
        wait_js(page, "document.querySelector('#turns li button.copy').textContent === 'Copied'")
        assert page.evaluate("navigator.clipboard.readText()") == want1
        assert "first token" in page.inner_text("#stats") and "tokens/s" in page.inner_text("#stats")
        assert page.locator("#pending .card").count() == 0

        # Follow-up: the conversation goes on with its history.
        q2 = "And the size?"
        ask_on_page(page, q2)
        wait_state(page, "done")
        want2 = c.chat.completions.create(model="tiny", temperature=0, max_tokens=16, messages=[
            first_msg, {"role": "assistant", "content": want1}, {"role": "user", "content": [
                {"type": "text", "text": q2}]}]).choices[0].message.content
        assert answers.nth(1).inner_text() == want2

        # Stop mid-answer: the answer stays, marked, and the sequence is freed.
        page.fill("#max-tokens", "3000")

        def longer(route):
            body = json.loads(route.request.post_data)
            body["min_tokens"] = 3000  # the tiny model would otherwise often finish at once
            route.continue_(post_data=json.dumps(body))

        page.route("**/v1/chat/completions", longer)
        ask_on_page(page, "Write a long report.")
        wait_js(page, "(document.querySelectorAll('#turns li .answer')[2]?.textContent || '').length > 0")
        page.click("#stop")
        wait_state(page, "stopped")
        page.unroute("**/v1/chat/completions")
        assert "(stopped)" in page.locator("#turns li").nth(2).inner_text()
        assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
        wait_js(page, f"fetch('/health', {{headers: {{Authorization: 'Bearer {KEY}'}}}}).then(r => r.json())"
                ".then(h => h.active === 0)")
        page.fill("#max-tokens", "16")
        ask_on_page(page, "Summarise.")
        wait_state(page, "done")

        # Errors are shown, never silent.
        ask_on_page(page, "lesion " * 6000)
        wait_state(page, "error")
        assert "Start a new conversation" in page.inner_text("#error")
        bad = tmp_path / "notes.png"
        bad.write_text("a clinical note, not an image")
        page.set_input_files("#file", str(bad))
        wait_js(page, "document.querySelector('#error').textContent.includes('cannot be read')")

        # Export the conversation as Markdown.
        with page.expect_download() as info:
            page.click("#export")
        text = Path(info.value.path()).read_text(encoding="utf-8")
        assert text.startswith("# huatuo-local conversation (tiny:f32)")
        assert q1 in text and want1 in text and q2 in text and want2 in text and "(stopped)" in text
        assert "images: chest.png, CT_small.dcm" in text
        # Each finished answer's record travels with it: the model files, the seed, each picture's digest.
        records = [json.loads(block.split("```", 1)[0]) for block in text.split("```json\n")[1:]]
        assert len(records) >= 2 and all(r["model"] == "tiny:f32" and r["llm_sha256"] for r in records)
        assert [len(r["images"]) for r in records[:1]] == [2] and all(
            len(i["picture_sha256"]) == 64 for i in records[0]["images"])
        assert "not a medical device" in text and "not a medical device" in page.inner_text("#notice")

        # Keyboard order and labels; readable at 1280x800 and narrow.
        for sel in ("#question", "#temperature", "#max-tokens", "#file"):
            assert page.locator(sel).evaluate("el => el.labels.length > 0"), sel
        order = []
        page.focus("#new")
        for _ in range(3):
            page.keyboard.press("Tab")
            order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        assert order[0] == "export", order
        for width in (1280, 420):
            page.set_viewport_size({"width": width, "height": 800})
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), width
        page.click("#new")
        assert page.locator("#turns li").count() == 0
        assert not problems, problems


def test_frames_errors_and_open(new_page, converted, tmp_path):
    """A multi-frame DICOM's frame control, the page's message for each server error, and `serve --open`."""
    from pathlib import Path

    model = converted(SPEC, "F32", "f32")
    opened = tmp_path / "opened.txt"
    fake_browser = tmp_path / "browser.sh"
    fake_browser.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    fake_browser.chmod(0o755)
    mri = Path(get_testdata_file("rtdose.dcm"))  # 15 frames
    with server(str(model.manifest_path), tmp_path, "--open", env={"BROWSER": f"{fake_browser} %s"}) as (url, _, _):
        deadline = time.time() + 30
        while not opened.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert opened.read_text().strip() == url + "/"
        page = new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "/")
        page.set_input_files("#file", str(mri))
        wait_js(page, "document.querySelectorAll('#pending img[data-digest]').length === 1")
        frame = page.locator("#pending .frame")
        assert frame.input_value() == "7" and frame.get_attribute("max") == "14"  # the loader's middle frame
        assert np.array_equal(pixels_of(page.locator("#pending img").get_attribute("src")),
                              preview_cli(mri, tmp_path))
        want = preview_cli(mri, tmp_path, "--frame", "2")
        frame.fill("2")
        frame.press("Tab")
        wait_js(page, "document.querySelector('#pending img').dataset.digest === "
                               f"'{hashlib.sha256(want.tobytes()).hexdigest()}'")
        # A multi-frame TIFF has the same control, and starts at its middle frame, as `preview` does.
        stack = tmp_path / "stack.tiff"
        frames = [Image.fromarray(np.full((40, 50, 3), 30 * i, np.uint8)) for i in range(5)]
        frames[0].save(stack, save_all=True, append_images=frames[1:])
        page.set_input_files("#file", str(stack))
        wait_js(page, "document.querySelectorAll('#pending img[data-digest]').length === 2")
        tiff = page.locator("#pending .card").nth(1)
        assert tiff.locator(".frame-control").is_visible() and tiff.locator(".frame").input_value() == "2"
        assert np.array_equal(pixels_of(tiff.locator("img").get_attribute("src")), preview_cli(stack, tmp_path))
        want = preview_cli(stack, tmp_path, "--frame", "4")
        tiff.locator(".frame").fill("4")
        tiff.locator(".frame").press("Tab")
        wait_js(page, "document.querySelectorAll('#pending img')[1].dataset.digest === "
                      f"'{hashlib.sha256(want.tobytes()).hexdigest()}'")
        assert page.locator("#pending .card").nth(0).locator(".frame-control").is_visible()
        # Two bad files dropped at once: both are refused by their own names, and no broken card stays.
        notes = tmp_path / "notes.png"
        notes.write_text("Patient notes, not an image.\n")
        lossy = tmp_path / "lossy-12bit.dcm"
        shutil.copy(get_testdata_file("JPEG-lossy.dcm"), lossy)
        page.evaluate("""(files) => {
            const dt = new DataTransfer();
            for (const [name, b64, mime] of files) {
                dt.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: mime}));
            }
            document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        }""", [[p.name, base64.b64encode(p.read_bytes()).decode(), m]
               for p, m in ((notes, "image/png"), (lossy, "application/dicom"))])
        wait_js(page, "document.querySelector('#error').textContent.includes('lossy-12bit.dcm was not added')")
        error = page.inner_text("#error")
        assert "notes.png was not added" in error and "supported format" in error, error
        assert "12 bits" in error and "uploaded image" not in error, error
        assert page.locator("#pending li").count() == 2
        # A 500 is a server bug (none is produced on purpose), so the page's handling of one is shown with
        # a stand-in in the server's shape; the other errors below come from a real server.
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=500, content_type="application/json", body=json.dumps({"error": {
                "message": "generation failed: boom", "type": "server_error", "param": None, "code": None}})))
        ask_on_page(page, "Hello?")
        wait_state(page, "error")
        assert "generation failed" in page.inner_text("#error")
        page.unroute("**/v1/chat/completions")
    # --open where no browser can start: said in one line, not silent (issue 33).
    # --ctx 40000: the busy answers below take long enough (30000 tokens) that "one answering, one waiting" lasts.
    with server(str(model.manifest_path), tmp_path, "--parallel", "1", "--max-queue", "1", "--max-body-mb", "1",
                "--ctx", "40000", "--open", env={"BROWSER": str(tmp_path / "no-such-browser") + " %s"}) as (
            url, _, log):
        deadline = time.time() + 30
        while "no browser could be opened" not in log.read_text() and time.time() < deadline:
            time.sleep(0.2)
        assert f"no browser could be opened here; open {url}/ yourself" in log.read_text()
        page = new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "/")
        wait_js(page, "document.querySelector('#model').textContent === 'tiny:f32'")
        ask_on_page(page, "x " * 600_000)  # a 1.2 MB request: over --max-body-mb
        wait_state(page, "error")
        assert "Too large" in page.inner_text("#error") and "larger than 1 MB" in page.inner_text("#error")
        long = {"messages": [{"role": "user", "content": "Write a long report."}], "max_tokens": 30000,
                "min_tokens": 30000, "temperature": 0.8}
        busy = [threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", json=long, timeout=300))
                for _ in range(2)]
        for t in busy:
            t.start()
        deadline = time.time() + 180  # (a loaded machine: the full suite beside it)
        while (health := httpx.get(f"{url}/health", timeout=30).json()).get("queued") != 1:  # one answering, one
            assert time.time() < deadline, health                                            # waiting: full
            time.sleep(0.05)
        ask_on_page(page, "Hello?")
        wait_state(page, "error")
        assert "busy answering others" in page.inner_text("#error")
    for t in busy:
        t.join(300)
    broken = tmp_path / "broken"
    shutil.copytree(model.manifest_path.parent, broken)
    (broken / model.llm_path.name).write_bytes(b"GGUF")  # resolves, but cannot load
    with server(str(broken / model.manifest_path.name), tmp_path, wait=False) as (url, _, _):
        page = new_page()
        for _ in range(100):
            try:
                page.goto(url + "/")
                break
            except Exception:
                time.sleep(0.2)
        wait_js(page, "document.querySelector('#error').textContent.includes('could not be loaded')")
        assert model.llm_path.name in page.inner_text("#error")


@pytest.mark.parametrize("backend", backend_params())
def test_a_json_schema_in_the_settings_shapes_the_answer(new_page, converted, png, tmp_path, backend):
    """Issue 35: the page's JSON Schema setting is sent as response_format; the answer on the page parses and
    validates (the model is random: its free text is no JSON); a schema that is no JSON, or one the server
    cannot enforce, is said in one sentence, and the question stays to send again. The same page on `serve --ray`
    (issue 30): the picture and the schema travel to a replica and back."""
    import jsonschema

    model = converted(SPEC, "F32", "f32")
    schema = {"type": "object", "properties": {"finding": {"type": "string", "maxLength": 30},
                                               "side": {"enum": ["left", "right"]}},
              "required": ["finding", "side"], "additionalProperties": False}
    with server(str(model.manifest_path), tmp_path, *BACKENDS[backend], deadline_s=300) as (url, _, _):
        page = new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "/")
        wait_js(page, "document.querySelector('#model').textContent === 'tiny:f32'")
        page.click("#ask summary")
        page.fill("#temperature", "0.9")
        page.fill("#schema", "{not json")
        ask_on_page(page, "Report the finding.")
        wait_js(page, "document.querySelector('#error').textContent.includes('not valid JSON')")
        assert page.input_value("#question") == "Report the finding."
        page.fill("#schema", json.dumps({"type": "string", "pattern": "(?<=a)b"}))
        page.press("#question", "Enter")
        wait_js(page, "document.querySelector('#error').textContent.includes('cannot be enforced')")
        page.fill("#schema", json.dumps(schema))
        drop_file(page, png, "image/png")
        wait_js(page, "document.querySelectorAll('#pending img[data-digest]').length === 1")
        ask_on_page(page, "Report the finding.")
        wait_state(page, "done")
        answer = page.locator("#turns .answer").last.inner_text()
        jsonschema.validate(json.loads(answer), schema)


def test_a_zipped_study_on_the_page(new_page, converted, tmp_path):
    """Issue 34: a zipped DICOM study dropped on the page: its montage is the picture the model sees (the same
    pixels as `chat` on the zip), the answer is chat's, a study of two series asks which one on the card and
    takes the choice, and the export carries each answer's record."""
    import zipfile

    from dicom_series import write_series

    model = converted(SPEC, "F32", "f32")
    one, two = tmp_path / "one.zip", tmp_path / "two.zip"
    write_series(tmp_path / "s1", 9, seed=41)
    write_series(tmp_path / "s2", 5, series_number=4, seed=42)
    write_series(tmp_path / "s2", 6, series_number=9, seed=43)
    for archive, folder in ((one, tmp_path / "s1"), (two, tmp_path / "s2")):
        with zipfile.ZipFile(archive, "w") as zf:
            for f in sorted(folder.iterdir()):
                zf.write(f, f.name)
    proc = run_cli("chat", "--model", str(model.manifest_path), "--temperature", "0", "--no-prefix-cache",
                   "--max-tokens", "16", "--json", str(one), "--montage", "3x3", "-p", "Describe the study.")
    assert proc.returncode == 0, proc.stderr
    want = json.loads(proc.stdout)
    with server(str(model.manifest_path), tmp_path) as (url, _, _):
        page = new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "/")
        wait_js(page, "document.querySelector('#model').textContent === 'tiny:f32'")
        page.set_input_files("#file", str(one))
        wait_js(page, "document.querySelectorAll('#pending img[data-digest]').length === 1")
        assert page.locator("#pending .study").is_visible() and page.input_value("#pending .montage") == "3x3"
        seen = page.locator("#pending img").get_attribute("src")
        assert hashlib.sha256(pixels_of(seen).tobytes()).hexdigest() == want["record"]["images"][0]["picture_sha256"]
        page.click("#ask summary")  # the settings: greedy, 16 tokens, as the chat above
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "16")
        ask_on_page(page, "Describe the study.")
        wait_state(page, "done")
        assert page.locator("#turns .answer").last.inner_text() == want["answer"]
        # A folder chosen on the page: zipped in the browser, the same picture as the zip's.
        page.set_input_files("#folder", str(tmp_path / "s1"))
        wait_js(page, "document.querySelectorAll('#pending img[data-digest]').length === 1")
        folder_card = page.locator("#pending .card").last
        assert folder_card.locator("img").get_attribute("data-digest") == want["record"]["images"][0]["picture_sha256"]
        assert folder_card.locator("figcaption").inner_text().startswith("s1.zip")
        folder_card.locator(".remove").click()
        # One slice at a time: the scrubber walks the series, each position chat's picture of that slice.
        proc = run_cli("chat", "--model", str(model.manifest_path), "--no-prefix-cache", "--max-tokens", "1",
                       "--json", str(one), "--slices", "6", "-p", "q")
        slice6 = json.loads(proc.stdout)["record"]["images"][0]["picture_sha256"]
        page.set_input_files("#file", str(one))
        card = page.locator("#pending .card").last
        wait_js(page, "document.querySelectorAll('#pending img[data-digest]').length === 1")
        card.locator(".montage").select_option("")
        wait_js(page, "!document.querySelector('#pending .card:last-child .scrub-control').hidden")
        card.locator(".scrub").evaluate("el => { el.value = '6'; el.dispatchEvent(new Event('input')); }")
        wait_js(page, f"document.querySelector('#pending .card:last-child img').dataset.digest === '{slice6}'")
        assert "slice 6" in card.locator("figcaption").inner_text()
        card.locator(".remove").click()
        # Two series: the card stays and says how to choose; choosing one shows its picture.
        page.set_input_files("#file", str(two))
        wait_js(page, "document.querySelector('#error').textContent.includes(\"'series'\")")
        assert "--series" not in page.inner_text("#error")
        page.locator("#pending .series").fill("9")
        page.locator("#pending .series").dispatch_event("change")
        wait_js(page, "document.querySelectorAll('#pending img[data-digest]').length === 1")
