"""Serving: huatuo-local serve vs llama.cpp's llama-server on the same files, same threads.

HuatuoGPT-Vision-7B's shapes with random weights (bench/runtime.py's checkpoint: the full CLIP
tower, the full 152064-token embeddings and head, Qwen2-7B layers at --depth), at --quant.
Every answer is exactly --tokens long (our `min_tokens`, llama-server's `ignore_eos`), so both
do the same work. Measured, for 1, 2 and 4 concurrent clients each asking --rounds questions:
aggregate decode tokens/s and p50/p95 time to first token; then the time to first token of a
text-only question sent while another client's image is being read, against the same question
alone; and each server's peak memory with 1 and with 4 sequences.

    .venv/bin/python bench/serve.py [--depth 4] [--quant Q4_K_M] [--threads 2] [--tokens 48]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import ROOT, append, free_port, invocation, write_json  # noqa: E402

QUESTION = "Case {:03d}: what does the picture show? Describe the findings in detail."


def peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict | None = None):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([c.replace("PORT", str(self.port)) for c in cmd], cwd=ROOT, stdout=self.log,
                                     stderr=self.log, env=dict(os.environ, **(env or {})))
        import httpx

        deadline = time.time() + 1800
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                text = Path(self.log.name).read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"{name} did not start: {text}")
            time.sleep(0.5)

    def stop(self) -> float:
        peak = peak_rss_gib(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)  # a bench leaves nothing behind in /tmp
        return peak


def ask(url: str, messages: list, tokens: int, fixed: dict) -> dict:
    """One streamed chat completion: time to first content, time of the last, pieces received."""
    import httpx

    body = {"messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True, **fixed}
    if "min_tokens" in body:
        body["min_tokens"] = min(body["min_tokens"], tokens)
    t0 = time.perf_counter()
    first = last = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
    return {"start": t0, "first": first or time.perf_counter(), "last": last or time.perf_counter()}


def clients(url: str, n: int, rounds: int, tokens: int, fixed: dict) -> dict:
    runs: list[dict] = []
    errors: list[str] = []

    def one(c: int) -> None:
        for r in range(rounds):
            try:
                runs.append(ask(url, [{"role": "user", "content": QUESTION.format(c * 100 + r)}], tokens, fixed))
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    ttft = sorted(r["first"] - r["start"] for r in runs)
    span = max(r["last"] for r in runs) - min(r["first"] for r in runs)
    decoded = len(runs) * (tokens - 1)
    return {"agg_tok_s": decoded / span, "p50_ttft_s": statistics.median(ttft),
            "p95_ttft_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def image_message(image: Path, n: int) -> list:
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": QUESTION.format(n)}]}]


def image_interference(url: str, image: Path, tokens: int, fixed: dict) -> dict:
    """A text question's time to first token alone, and while another client's image is read."""
    text = [{"role": "user", "content": QUESTION.format(999)}]
    solos = []
    for _ in range(2):
        r = ask(url, text, 4, fixed)
        solos.append(r["first"] - r["start"])
    solo = min(solos)
    image_msg = image_message(image, 998)
    out: dict = {}

    def image_client() -> None:
        r = ask(url, image_msg, tokens, fixed)
        out["image_ttft_s"] = r["first"] - r["start"]

    t = threading.Thread(target=image_client)
    t.start()
    time.sleep(0.5)  # the image request is in, its encoding under way
    r = ask(url, text, 4, fixed)
    t.join()
    out.update(text_solo_ttft_s=solo, text_during_image_ttft_s=r["first"] - r["start"])
    return out


def prepare_model(args) -> tuple[Path, Path, Path]:
    from huatuo_local.convert.pipeline import convert

    import runtime as rt  # bench/runtime.py: the 7B-shaped checkpoint writer

    if args.tiny:
        rt.tiny_shapes()
    work = args.workdir
    image = rt.write_image(work)
    ckpt = rt.write_checkpoint(work, args.depth)
    out = work / f"gguf-{args.depth}"
    manifest = out / f"m-{args.quant}.manifest.json"
    if not manifest.is_file():
        convert(ckpt, out, quant=args.quant, mmproj_type="f16", name="m")
    return manifest, image, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/huatuo-bench-runtime"))
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per answer (fixed)")
    ap.add_argument("--rounds", type=int, default=2, help="questions per client")
    ap.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--ngl", type=int, default=0, help="layers on the GPU for both servers (99: all)")
    ap.add_argument("--no-llama-server", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (keeps the script working in tests)")
    args = ap.parse_args()
    manifest, image, out = prepare_model(args)
    llm, mmproj = out / f"m-{args.quant}.gguf", out / "mmproj-m-f16.gguf"
    home = Path(tempfile.mkdtemp(prefix="bench-serve-home-"))
    contenders = {"huatuo-local": lambda np_: Server("huatuo-local", [
        sys.executable, "-m", "huatuo_local", "serve", "--model", str(manifest), "--port", "PORT", "--parallel",
        str(np_), "--threads", str(args.threads), "--ctx", str(args.ctx), "--no-prefix-cache", "-ngl", str(args.ngl)],
        {"HUATUO_LOCAL_HOME": str(home)})}
    fixed = {"huatuo-local": {"min_tokens": args.tokens}, "llama-server": {"ignore_eos": True}}
    if not args.no_llama_server:
        try:
            import llama_tools

            bin_dir = llama_tools.bin_folder()
            contenders["llama-server"] = lambda np_: Server("llama-server", [
                str(bin_dir / "llama-server"), "-m", str(llm), "--mmproj", str(mmproj), "--jinja", "-np", str(np_),
                "-c", str(args.ctx * np_), "-t", str(args.threads), "--host", "127.0.0.1", "--port", "PORT",
                "--load-mode", "none", "-ngl", str(args.ngl)], {"LD_LIBRARY_PATH": str(bin_dir)})
        except Exception as exc:  # a missing compiler must not stop our own figures
            print(f"llama-server skipped: {exc}")
    results: dict = {}
    for name, start in contenders.items():
        solo = start(1)
        try:
            results[(name, "1seq")] = clients(solo.url, 1, args.rounds, args.tokens, fixed[name])
            ask(solo.url, image_message(image, 997), args.tokens, fixed[name])  # the same kinds of work as below
        finally:
            results[(name, "peak1")] = solo.stop()
        srv = start(max(args.clients))
        try:
            for n in args.clients:
                results[(name, n)] = clients(srv.url, n, args.rounds, args.tokens, fixed[name])
            results[(name, "image")] = image_interference(srv.url, image, args.tokens, fixed[name])
        finally:
            results[(name, "peakN")] = srv.stop()
        print(name, {k: v for k, v in results.items() if k[0] == name}, flush=True)
    shutil.rmtree(home, ignore_errors=True)
    report(results, args, list(contenders))


def report(results: dict, args, names: list[str]) -> None:
    rows = ["| clients | " + " | ".join(f"{n} agg tok/s | {n} TTFT p50 / p95 (s)" for n in names)
            + (" | ours / llama-server |" if len(names) > 1 else " |"),
            "|---|" + "---|---|" * len(names) + ("---|" if len(names) > 1 else "")]
    for c in args.clients:
        cells = []
        for n in names:
            r = results[(n, c)]
            cells += [f"{r['agg_tok_s']:.2f}", f"{r['p50_ttft_s']:.2f} / {r['p95_ttft_s']:.2f}"]
        ratio = (f" | {results[(names[0], c)]['agg_tok_s'] / results[(names[1], c)]['agg_tok_s']:.2f}"
                 if len(names) > 1 else "")
        rows.append(f"| {c} | " + " | ".join(cells) + ratio + " |")
    top, low = max(args.clients), min(args.clients)  # `--clients 16` alone: 16 against itself
    write_json(args.json, {"depth": args.depth, "quant": args.quant, "tokens": args.tokens, "ngl": args.ngl,
                           "clients": args.clients,
                           "results": {name: {str(k): v for (n, k), v in results.items() if n == name}
                                       for name in names},
                           "ratios": ({str(c): results[(names[0], c)]["agg_tok_s"] / results[(names[1], c)]["agg_tok_s"]
                                       for c in args.clients} if len(names) > 1 else {}),
                           "goals": {"16": ">= 0.9 (llama-server -np 16)"}})
    lines = ["\n".join(rows), ""]
    for n in names:
        one, many, img = results[(n, low)], results[(n, top)], results[(n, "image")]
        lines.append(f"- {n}: aggregate with {top} clients = {many['agg_tok_s'] / one['agg_tok_s']:.2f}x "
                     f"{low} client{'s' if low > 1 else ''}; a text question's first token alone "
                     f"{img['text_solo_ttft_s']:.2f} s, while another "
                     f"client's image is read {img['text_during_image_ttft_s']:.2f} s (the image's own first "
                     f"token {img['image_ttft_s']:.2f} s); peak memory {results[(n, 'peak1')]:.2f} GiB with one "
                     f"sequence, {results[(n, 'peakN')]:.2f} GiB with {top}.")
    if len(names) > 1:
        ours, theirs = results[(names[0], top)], results[(names[1], top)]
        lines.append(f"- Goal: aggregate with {top} clients >= 0.95x llama-server's: "
                     f"{ours['agg_tok_s'] / theirs['agg_tok_s']:.2f}x.")
    if args.no_append:
        print("\n".join(lines))
        return
    append(f"Serve: {args.depth}-layer 7B shapes at {args.quant}, {args.tokens}-token answers, {args.threads} "
           "threads", invocation(), "\n".join(lines),
           "Aggregate decode tokens/s: every client's tokens after its first, over the time from the first "
           "client's first token to the last client's last. llama-server gets the raw image (letterbox) and "
           "our server the release's pad-and-resize: the work is the same, the answers differ by design "
           "(docs/RELEASE.md). Both servers map the weights (llama-server by default; ours drops the pages "
           "llama.cpp copied into its repacked buffers).")


if __name__ == "__main__":
    main()
