"""The interactive chat: streaming answers, /commands, Ctrl-C to stop an answer."""

from __future__ import annotations

import json
import select
import shlex
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.notice import NOTICE
from huatuo_local.models.private import write_private
from huatuo_local.models.prompt import MAX_IMAGES
from huatuo_local.runtime.api import HuatuoChatbot
from huatuo_local.runtime.cli.progress import PromptStatus
from huatuo_local.runtime.cli.terminal import shown
from huatuo_local.runtime.images.dicom import parse_window
from huatuo_local.runtime.images.loader import (
    ImageInput,
    ImageSpec,
    LoadOptions,
    check_images,
    expand_inputs,
    image_name,
)
from huatuo_local.runtime.images.study import parse_montage

HELP = """Commands:
  /image PATH [--window W] [--frame N] [--series N] [--slices S] [--montage RxC]
                add an image to your next question (up to 6 per conversation; quotes are fine);
                --window (lung, bone, ... or C,W) and --frame apply to this image only;
                PATH may be a DICOM study (folder, .zip, DICOMDIR): --series, --slices
                (auto, auto:4, 40:80:10, 12,30) and --montage 3x3 choose what the model sees
  /images       list the images waiting for your next question
  /drop [N]     remove waiting image N (default: the last one added)
  /clear        forget the conversation and its images
  /save FILE    write the transcript (.md for Markdown, .json for JSON)
  /help         this help
  /quit         leave (Ctrl-D too); Ctrl-C stops an answer in progress
A question may span lines: paste it, or type \"\"\" to start and end one."""


@dataclass
class Transcript:
    """What the REPL saw of each turn beyond the session's text: which images, and whether it was stopped."""

    images: list[list[str]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)
    records: list[dict | None] = field(default_factory=list)  # each answer's record (core/record.py)

    def add(self, images: list[str], stopped: bool, record: dict | None = None) -> None:
        self.images.append(list(images))
        self.stopped.append(stopped)
        self.records.append(record)

    def clear(self) -> None:
        self.images.clear()
        self.stopped.clear()
        self.records.clear()


def _save(bot: HuatuoChatbot, target: str, seen: Transcript | None = None) -> str:
    path = Path(target).expanduser()
    seen = seen or Transcript()
    turns = []
    for i, t in enumerate(bot.session.turns):
        names = [Path(n).name for n in seen.images[i]] if i < len(seen.images) else []
        names += [f"image {k + 1}" for k in range(len(names), t.n_images)]  # always a list, one name per image
        turns.append({"user": t.text, "images": names, "assistant": t.answer,
                      "stopped": i < len(seen.stopped) and seen.stopped[i],
                      "record": seen.records[i] if i < len(seen.records) else None})
    if path.suffix.lower() == ".json":
        text = json.dumps({"model": bot.model.ref, "notice": NOTICE, "turns": turns}, indent=2, ensure_ascii=False)
    elif path.suffix.lower() in (".md", ".markdown"):
        parts = [f"# huatuo-local transcript ({bot.model.ref})\n", f"_{NOTICE}_\n"]
        for t in turns:
            shown = ", ".join(t["images"])
            parts.append(f"**User**{' (' + shown + ')' if shown else ''}: {t['user']}\n")
            parts.append(f"**Assistant**{' (stopped)' if t['stopped'] else ''}: {t['assistant']}\n")
            if t["record"]:
                parts.append(_record_line(t["record"]) + "\n")
        text = "\n".join(parts)
    else:
        raise HuatuoError(f"{path}: use a .md or .json file name")
    # A transcript holds patient information: created owner-only (0600), atomically.
    try:
        write_private(path, text)
    except OSError as exc:
        raise HuatuoError(f"{path}: cannot write ({exc.strerror or exc}); choose another file") from exc
    return str(path)


def _record_line(record: dict) -> str:
    """A turn's record in a Markdown transcript: one line a reader can check an answer against."""
    sampling = record.get("sampling", {})
    pictures = "; ".join(f"{_picture_name(i)} sha256 {i.get('picture_sha256', '')[:16]}"
                         for i in record.get("images", []))
    llm = (record.get("llm_sha256") or "")[:16]
    return (f"<sub>{record.get('model')} (LLM sha256 {llm}…), engine {record.get('engine', {}).get('llama_cpp_python')}"
            f", temperature {sampling.get('temperature')}, seed {record.get('seed')}, {record.get('date')}"
            f"{'; pictures: ' + pictures if pictures else ''}</sub>")


def _picture_name(image: dict) -> str:
    if image.get("study"):
        return f"{Path(image['study']).name} series {image.get('series_number')} slices {image.get('slices')}"
    return Path(str(image.get("file") or image.get("given") or "image")).name


def image_argument(arg: str) -> str:
    """`/save`'s argument as a path: quotes and backslash-escaped spaces (what drag-and-drop gives) undone."""
    try:
        words = shlex.split(arg)
    except ValueError:  # an unbalanced quote: take the text as it is
        words = [arg.strip("'\"")]
    return " ".join(words)


_IMAGE_FLAGS = {"--window": "lung", "--frame": "3", "--series": "2", "--slices": "auto:4", "--montage": "3x3"}


def image_command(arg: str, defaults: LoadOptions) -> ImageSpec:
    """`/image PATH [--window W] [--frame N] [--series N] [--slices S] [--montage RxC]`: the path (quoted, or
    with escaped spaces, as drag-and-drop gives it) and this image's own options over the conversation's."""
    try:
        words = shlex.split(arg)
    except ValueError:  # an unbalanced quote: take the text as it is
        words = [arg.strip("'\"")]
    path, options = [], defaults
    i = 0
    while i < len(words):
        word = words[i]
        if word in _IMAGE_FLAGS:
            if i + 1 >= len(words):
                raise HuatuoError(f"/image: {word} needs a value, e.g. /image scan.dcm {word} {_IMAGE_FLAGS[word]}")
            value = words[i + 1]
            if word == "--window":
                options = replace(options, window=parse_window(value))
            elif word == "--frame":
                if not value.isdigit():
                    raise HuatuoError(f"/image: --frame {value}: give a frame number, 0 or more")
                options = replace(options, frame=int(value))
            elif word == "--series":
                options = replace(options, series=value)
            elif word == "--slices":
                options = replace(options, slices=value)
            else:
                options = replace(options, montage=parse_montage(value))
            i += 2
            continue
        path.append(word)
        i += 1
    if not path:
        raise HuatuoError("usage: /image PATH [--window W] [--frame N] [--series N] [--slices S] [--montage RxC]")
    return ImageSpec(str(Path(" ".join(path)).expanduser()), options)


class _NextTurnPrefill:
    """Evaluates the next turn's shared beginning in a thread while the user types.

    llama.cpp releases the GIL, so typing stays responsive; anything else that touches the
    session waits for it first (`settle`). Errors are left to the next turn, which redoes the work.
    """

    def __init__(self, bot: HuatuoChatbot):
        self.bot = bot
        self.thread: threading.Thread | None = None

    def start(self, images: list[ImageInput] | None = None) -> None:
        """After an answer: the next turn's shared start; with `images`: those images, read now."""
        self.settle()
        work = (lambda: self.bot.prefill_images(images)) if images else self.bot.prefill_next_turn
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self.thread.start()

    @staticmethod
    def _run(work) -> None:
        try:
            work()
        except Exception:  # the next turn starts clean and reports real errors
            pass

    def settle(self) -> None:
        """Wait for the background work; Ctrl-C stops it instead (the next turn redoes what is missing)."""
        if self.thread is None:
            return
        try:
            self.thread.join()
        except KeyboardInterrupt:
            self.bot.session.cancel_background()
            self.thread.join()
            raise
        finally:
            if not self.thread.is_alive():
                self.thread = None


PASTE_GAP_S = 0.05  # lines that arrive closer together than this came from one paste, not from typing


def _more_waiting(timeout: float) -> bool:
    """Whether more input is already there (the rest of a paste); False where stdin cannot be polled."""
    try:
        return bool(select.select([sys.stdin], [], [], timeout)[0])
    except (OSError, ValueError):
        return False


def read_question(out) -> str:
    """One question: a line; the lines of a paste together (they arrive at once, a typist's do not); or
    everything between two lines of \"\"\" (as in Ollama)."""
    first = input(">>> ")
    if first.strip().startswith('"""'):
        lines = [first.strip()[3:]]
        while True:
            line = input("... ")
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip()
            lines.append(line)
    lines = [first]
    while _more_waiting(PASTE_GAP_S):
        lines.append(input(""))
    return "\n".join(lines)


def run(bot: HuatuoChatbot, images: list[ImageInput], out=sys.stdout) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    prefill = _NextTurnPrefill(bot)
    try:
        return _loop(bot, images, out, prefill)
    finally:
        prefill.settle()


def _loop(bot: HuatuoChatbot, images: list[ImageInput], out, prefill: _NextTurnPrefill) -> int:
    pending: list[ImageInput] = list(images)
    seen = Transcript()
    print(f"huatuo-local chat with {bot.model.ref}. /help for commands, Ctrl-D to leave.", file=out)
    print(NOTICE, file=out)
    if bot.session.scheduler.vision_warning:
        print(bot.session.scheduler.vision_warning, file=sys.stderr)
    if pending:
        prefill.start(list(pending))  # the images come first in the turn: read them while the question is typed
    while True:
        try:
            line = read_question(out)
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print(file=out)
            continue
        line = line.strip()
        if not line:
            continue
        try:
            prefill.settle()
        except KeyboardInterrupt:
            print("(stopped)", file=out)
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            try:
                if _command(bot, cmd, arg.strip(), pending, seen, prefill, out):
                    return 0
            except HuatuoError as exc:
                print(f"error: {exc}", file=sys.stderr)
            continue
        if _ask(bot, line, pending, seen, out):
            pending.clear()
            prefill.start()


def _command(bot: HuatuoChatbot, cmd: str, arg: str, pending: list[ImageInput], seen: Transcript,
             prefill: _NextTurnPrefill, out) -> bool:
    """Run one /command; True when the chat should end."""
    if cmd in ("/quit", "/exit", "/bye"):
        return True
    if cmd == "/help":
        print(HELP, file=out)
    elif cmd == "/clear":
        bot.clear_history()
        pending.clear()
        seen.clear()
        print("(conversation cleared)", file=out)
    elif cmd == "/image":
        if not arg:
            raise HuatuoError("usage: /image PATH [--window W] [--frame N]")
        spec = image_command(arg, bot.session.image_options)
        pictures = expand_inputs([spec])  # a study: its chosen slices, each a picture (or one montage)
        if len(bot.session.images) + len(pending) + len(pictures) > MAX_IMAGES:
            raise HuatuoError(f"a conversation holds at most {MAX_IMAGES} images (the release's limit); "
                              f"{len(bot.session.images) + len(pending)} are taken and this adds {len(pictures)}: "
                              "/drop one waiting image, /clear to start over, or tile a study with --montage")
        for note in check_images(pictures, spec.options):  # read now: a bad file fails here
            print(note, file=sys.stderr)
        pending.extend(pictures)
        for picture in pictures:
            print(f"(image added: {image_name(picture)}; it goes with your next question)", file=out)
        prefill.start(list(pending))
    elif cmd == "/images":
        print("\n".join(f"  {i}. {image_name(p)}" for i, p in enumerate(pending, 1)) or "(no images waiting)",
              file=out)
    elif cmd == "/drop":
        if not pending:
            raise HuatuoError("no images are waiting for the next question")
        if arg and not (arg.isdigit() and 1 <= int(arg) <= len(pending)):
            raise HuatuoError(f"/drop N: N is 1 to {len(pending)} (see /images)")
        gone = pending.pop(int(arg) - 1 if arg else -1)
        print(f"(dropped {image_name(gone)}; {len(pending)} waiting)", file=out)
        if pending:
            prefill.start(list(pending))
    elif cmd == "/save":
        if not arg:
            raise HuatuoError("usage: /save FILE.md or /save FILE.json")
        print(f"(saved {_save(bot, image_argument(arg), seen)})", file=out)
    else:
        raise HuatuoError(f"unknown command {cmd}; /help lists them")
    return False


def _ask(bot: HuatuoChatbot, line: str, pending: list[ImageInput], seen: Transcript, out) -> bool:
    """Ask one question with the waiting images; True when the turn happened (answered or stopped)."""
    status = PromptStatus()
    stopped = False
    try:
        stream = bot.stream(line, pending, on_progress=status)
        for piece in stream:
            status.stop()  # the answer starts: the status line goes
            out.write(shown(piece))  # a control character in the answer is shown, never executed
            out.flush()
    except KeyboardInterrupt:
        stream.close()
        stopped = True
        out.write("\n(answer stopped)")
    except HuatuoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    finally:
        status.stop()
    reply = getattr(bot.session, "last_reply", None)
    seen.add([image_name(p) for p in pending], stopped, reply.record if reply is not None and not stopped else None)
    out.write("\n")
    warning = bot.session.scheduler.vision_warning
    if warning:
        print(warning, file=sys.stderr)
    out.flush()
    return True
