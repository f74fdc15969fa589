"""The interactive chat: streaming answers, /commands, Ctrl-C to stop an answer."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.private import write_private

from .api import HuatuoChatbot
from .progress import PromptStatus

HELP = """Commands:
  /image PATH   add an image to your next question (up to 6 per conversation)
  /clear        forget the conversation and its images
  /save FILE    write the transcript (.md for Markdown, .json for JSON)
  /help         this help
  /quit         leave (Ctrl-D too); Ctrl-C stops an answer in progress"""


def _save(bot: HuatuoChatbot, target: str) -> str:
    path = Path(target).expanduser()
    turns = [{"user": t.text, "images": t.n_images, "assistant": t.answer} for t in bot.session.turns]
    if path.suffix.lower() == ".json":
        text = json.dumps({"model": bot.model.name, "turns": turns}, indent=2, ensure_ascii=False)
    elif path.suffix.lower() in (".md", ".markdown"):
        parts = [f"# huatuo-local transcript ({bot.model.name})\n"]
        for t in turns:
            parts.append(f"**User**{' (' + str(t['images']) + ' image(s))' if t['images'] else ''}: {t['user']}\n")
            parts.append(f"**Assistant**: {t['assistant']}\n")
        text = "\n".join(parts)
    else:
        raise HuatuoError(f"{path}: use a .md or .json file name")
    # A transcript holds patient information: created owner-only (0600), atomically.
    try:
        write_private(path, text)
    except OSError as exc:
        raise HuatuoError(f"{path}: cannot write ({exc.strerror or exc}); choose another file") from exc
    return str(path)


class _NextTurnPrefill:
    """Evaluates the next turn's shared beginning in a thread while the user types.

    llama.cpp releases the GIL, so typing stays responsive; anything else that touches the
    session waits for it first (`settle`). Errors are left to the next turn, which redoes the work.
    """

    def __init__(self, bot: HuatuoChatbot):
        self.bot = bot
        self.thread: threading.Thread | None = None

    def start(self, images: list[str] | None = None) -> None:
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


def run(bot: HuatuoChatbot, images: list[str], out=sys.stdout) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    prefill = _NextTurnPrefill(bot)
    try:
        return _loop(bot, images, out, prefill)
    finally:
        prefill.settle()


def _loop(bot: HuatuoChatbot, images: list[str], out, prefill: _NextTurnPrefill) -> int:
    pending = list(images)
    print(f"huatuo-local chat with {bot.model.name}. /help for commands, Ctrl-D to leave.", file=out)
    if bot.engine.vision_warning:
        print(bot.engine.vision_warning, file=sys.stderr)
    if pending:
        prefill.start(list(pending))  # the images come first in the turn: read them while the question is typed
    while True:
        try:
            line = input(">>> ")
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
            arg = arg.strip()
            try:
                if cmd in ("/quit", "/exit", "/bye"):
                    return 0
                if cmd == "/help":
                    print(HELP, file=out)
                elif cmd == "/clear":
                    bot.clear_history()
                    pending.clear()
                    print("(conversation cleared)", file=out)
                elif cmd == "/image":
                    if not arg:
                        raise HuatuoError("usage: /image PATH")
                    if not Path(arg).expanduser().is_file():
                        raise HuatuoError(f"{arg}: no such file")
                    pending.append(str(Path(arg).expanduser()))
                    print(f"(image added: {arg}; it goes with your next question)", file=out)
                    prefill.start(list(pending))
                elif cmd == "/save":
                    if not arg:
                        raise HuatuoError("usage: /save FILE.md or /save FILE.json")
                    print(f"(saved {_save(bot, arg)})", file=out)
                else:
                    raise HuatuoError(f"unknown command {cmd}; /help lists them")
            except HuatuoError as exc:
                print(f"error: {exc}", file=sys.stderr)
            continue
        status = PromptStatus()
        try:
            stream = bot.stream(line, pending, on_progress=status)
            for piece in stream:
                status.stop()  # the answer starts: the status line goes
                out.write(piece)
                out.flush()
            pending = []
        except KeyboardInterrupt:
            stream.close()
            pending = []
            out.write("\n(answer stopped)")
        except HuatuoError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        finally:
            status.stop()
        out.write("\n")
        warning = bot.engine.vision_warning
        if warning:
            print(warning, file=sys.stderr)
        out.flush()
        prefill.start()
