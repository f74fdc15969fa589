"""The local store: convert, pull, list, info and rm."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from huatuo_local.runtime.cli.app import app, fail


@app.command(epilog="Examples:\n\n  huatuo-local convert ./HuatuoGPT-Vision-7B --name huatuo-vision-7b   "
                   "(into the local store: then chat --model huatuo-vision-7b)\n\n"
                   "  huatuo-local convert FreedomIntelligence/HuatuoGPT-Vision-7B -o models/ --quant Q4_K_M\n\n"
                   "  huatuo-local convert ./HuatuoGPT-Vision-34B --quant IQ3_XXS --imatrix auto   (a 12.9 GiB file)")
def convert(
    src: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="Checkpoint folder, or a Hugging Face repo id "
                                                                  "to download.")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output folder for the GGUF pair and manifest "
                                                                 "(default: the local store, as --name).")] = None,
    quant: Annotated[str, typer.Option(help="LLM type: F32, F16, BF16, Q8_0, or a llama.cpp quant (Q6_K, "
                                            "Q5_K_M, Q4_K_M, IQ4_XS, Q3_K_M, IQ3_M, IQ3_XXS, IQ2_M, IQ2_XS, ...).")]
    = "Q4_K_M",
    mmproj_type: Annotated[str, typer.Option(help="Vision projector type: f16, q8_0 or f32.")] = "f16",
    vision_tower: Annotated[str | None, typer.Option(help="CLIP tower folder or repo id, when the "
                                                             "checkpoint does not hold it.")] = None,
    name: Annotated[str | None, typer.Option(help="The model's name in the store (without -o), or the base name "
                                                  "of the output files (default: the checkpoint folder's name).")]
    = None,
    threads: Annotated[int, typer.Option(help="Quantizer threads (0: all cores).")] = 0,
    imatrix: Annotated[str | None, typer.Option(metavar="auto|FILE", help="Importance matrix, needed by the 2- and "
                                                "3-bit IQ quants and better for every llama.cpp quant: auto runs "
                                                "image+text calibration conversations through the model itself; "
                                                "FILE is llama.cpp's imatrix GGUF. Kept beside the model.")] = None,
    calibration: Annotated[Path | None, typer.Option(metavar="FOLDER|JSON", help="With --imatrix auto: your own "
                                                     "calibration, a folder of images (the model answers its own "
                                                     "questions) or a JSON list of {image, question, answer} "
                                                     "(default: the bundled medical images).")] = None,
) -> None:
    """Convert a HuatuoGPT-Vision checkpoint into NAME-QUANT.gguf + mmproj-NAME-TYPE.gguf."""
    from huatuo_local.convert.pipeline import convert as run_convert
    from huatuo_local.convert.pull import store_name_for
    from huatuo_local.models.store import store_folder
    from huatuo_local.runtime.cli.progress import StageProgress
    from huatuo_local.runtime.quantize.imatrix import matrix_source

    into_store = out is None
    if out is None:  # into the local store, where `list`, `chat --model NAME` and `rm` find it
        name = name or store_name_for(src)
        out = store_folder(name)
    with StageProgress() as bar:
        matrix = matrix_source(imatrix, calibration, threads or None, bar.update)
        result = run_convert(src, out, quant=quant, mmproj_type=mmproj_type, vision_tower=vision_tower,
                             name=name, progress=bar.update, threads=threads, imatrix=matrix)
    typer.echo(f"wrote {result.llm_path}")
    typer.echo(f"wrote {result.mmproj_path}")
    typer.echo(f"wrote {result.manifest_path}")
    if result.manifest.imatrix_file:
        typer.echo(f"wrote {result.llm_path.parent / result.manifest.imatrix_file} (importance matrix)")
    if into_store:
        typer.echo(f"in the local store as {out.name}:{result.manifest.quant.lower()}; try: huatuo-local chat IMAGE "
                   f"--model {out.name}")

@app.command(epilog="Examples:\n\n  huatuo-local pull huatuo-vision-7b   (the best quant for this machine's free "
                   "memory)\n\n"
                   "  huatuo-local pull huatuo-vision-7b --quant Q8_0   (kept beside others as "
                   "huatuo-vision-7b:q8_0)\n\n"
                   "  huatuo-local pull huatuo-vision-34b --memory 16   (chosen for a machine with 16 GiB free)\n\n"
                   "  huatuo-local pull ./HuatuoGPT-Vision-7B --name huatuo-vision-7b   (a checkpoint copied over)")
def pull(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="huatuo-vision-7b, huatuo-vision-34b, a Hugging Face "
                                                               "repo id, or a checkpoint folder on this machine.")],
    quant: Annotated[str | None, typer.Option(help="LLM quant (default: for a known model, the best whose weights, "
                                                   "KV cache and buffers fit this machine's free GPU memory or RAM; "
                                                   "else Q4_K_M).")] = None,
    memory: Annotated[float | None, typer.Option(help="Choose the quant for this much free memory, in GiB, instead "
                                                      "of this machine's (a model for another machine).")] = None,
    name: Annotated[str | None, typer.Option(help="Name in the local store.")] = None,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit of the repository (default: main); "
                                                      "the commit is recorded in the manifest.")] = None,
    keep: Annotated[str | None, typer.Option(metavar="lossless|checkpoint|none", help="What to keep so that "
                                             "another quant needs no download: the lossless conversion (default "
                                             "for downloads; NAME:bf16 in the store, about the download's size), "
                                             "the downloaded checkpoint (NAME:checkpoint), or nothing (the "
                                             "default for a folder). `rm` removes either.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Make NAME:QUANT again even if it is installed.")] = False,
) -> None:
    """Download a model (and convert it when needed) into the local store, or convert a checkpoint folder
    already on this machine into it. Converting a 7B needs about 2.5x its download size of free disk while it
    runs; pull checks before downloading. Quants below 4 bits get an importance matrix computed from image and
    text prompts (the F16 model is read through for it)."""
    from huatuo_local.convert.pipeline import WANTS_IMATRIX
    from huatuo_local.convert.pull import KEEP
    from huatuo_local.convert.pull import pull as run_pull
    from huatuo_local.runtime.cli.progress import StageProgress
    from huatuo_local.runtime.quantize.imatrix import matrix_source

    if keep is not None and keep not in KEEP:
        fail(f"--keep {keep}: choose {', '.join(KEEP)}")
    if quant is None:
        quant = _quant_for(model, memory)
    elif memory is not None:
        fail("--memory chooses the quant: give it or --quant, not both")
    with StageProgress() as bar:
        matrix = matrix_source("auto", None, None, bar.update) if (quant or "").upper() in WANTS_IMATRIX else None
        pulled = run_pull(model, quant, name, progress=bar.update, revision=revision, imatrix=matrix, keep=keep,
                          force=force)
    resolved = pulled.model
    commit = f", commit {resolved.manifest.revision[:12]}" if resolved.manifest and resolved.manifest.revision else ""
    if pulled.already:
        typer.echo(f"{resolved.ref} is already installed ({resolved.llm_path.name}{commit}, "
                   f"{resolved.size_bytes / 1024**3:.2f} GiB); --force makes it again")
        return
    if pulled.made_from and pulled.made_from not in ("download", model):
        typer.echo(f"made from {pulled.made_from}, without downloading")
    if pulled.kept:
        typer.echo(f"kept {pulled.kept}: another quant of it needs no download; "
                   f"`huatuo-local rm {pulled.kept.split()[0]}` frees it (--keep none next time)")
    typer.echo(f"ready: {resolved.ref} ({resolved.llm_path.name}{commit}); "
               f"try: huatuo-local chat IMAGE --model {resolved.ref}")


def _quant_for(model: str, memory: float | None) -> str | None:
    """A known model's best quant for this machine (or `memory` GiB), said on stderr with what else fits."""
    from huatuo_local.models.registry import GIB, KNOWN_MODELS
    from huatuo_local.models.sizing import best_quant, machine_choice
    from huatuo_local.runtime.llama.devices import free_memory

    known = KNOWN_MODELS.get(model)
    if known is None:
        if memory is not None:
            fail(f"--memory: huatuo-local knows the sizes of {', '.join(KNOWN_MODELS)} only; give --quant")
        return None  # the default quant of a repository or folder
    if memory is not None and not 0 < memory < 1e6:
        fail(f"--memory {memory}: give the free memory in GiB, e.g. --memory 16")
    choice = best_quant(known, int(memory * GIB)) if memory is not None else machine_choice(known, free_memory())
    if choice.quant is None:
        hint = (f"; with --ctx {choice.stretch[1]} --kv-type q8_0 {choice.stretch[0]} would fit: add --quant "
                f"{choice.stretch[0]}" if choice.stretch else "; free memory, or choose one with --quant")
        fail(f"{model}: {choice.describe()}{hint}")
    others = f"; also fits: {', '.join(choice.fits[1:4])}" if len(choice.fits) > 1 else ""
    stretch = (f"; with --ctx {choice.stretch[1]} --kv-type q8_0, {choice.stretch[0]} would fit"
               if choice.stretch else "")
    typer.echo(f"choosing {choice.describe()}{others}{stretch}", err=True)
    return choice.quant

@app.command(name="list", epilog="Examples:\n\n  huatuo-local list\n\n  huatuo-local list --json")
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per model, in a list.")] = False,
) -> None:
    """List the models in the local store ($HUATUO_LOCAL_HOME/models), and the checkpoints kept by pull."""
    import json

    from huatuo_local.models.store import KeptCheckpoint, list_models, models_dir

    found = list_models()
    rows = [{"ref": m.ref, "name": m.store_name, "quant": m.quant, "size_bytes": m.size_bytes,
             "files": [m.llm_path.name, m.mmproj_path.name], "revision": m.manifest.revision if m.manifest else ""}
            for m in found]
    for folder in sorted({m.folder for m in found} | ({p for p in models_dir().iterdir() if p.is_dir()}
                                                     if models_dir().is_dir() else set())):
        kept = KeptCheckpoint.read(folder) if not folder.is_symlink() else None
        if kept is not None:
            rows.append({"ref": f"{folder.name}:checkpoint", "name": folder.name, "quant": "checkpoint",
                         "size_bytes": kept.bytes, "files": [str(kept.folder)], "revision": kept.revision})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no models in {models_dir()}; get one with: huatuo-local pull huatuo-vision-7b")
        return
    width = max(len(r["ref"]) for r in rows)
    typer.echo(f"{'NAME':<{width}}  {'SIZE':>9}  FILES")
    for r in rows:
        typer.echo(f"{r['ref']:<{width}}  {r['size_bytes'] / 1024**3:5.2f} GiB  {' + '.join(r['files'])}")

@app.command(epilog="Examples:\n\n  huatuo-local info huatuo-vision-7b\n\n  huatuo-local info huatuo-vision-7b --json")
def info(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model name, folder, manifest or .gguf file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print every field as JSON.")] = False,
) -> None:
    """Show a model's files, source, quantization and checksums."""
    import json
    from dataclasses import asdict

    from huatuo_local.models.gguf_check import check_gguf
    from huatuo_local.models.store import resolve

    m = resolve(model)
    llm, mmproj = check_gguf(m.llm_path, "llm"), check_gguf(m.mmproj_path, "mmproj")
    data = asdict(m.manifest) if m.manifest else {"name": m.name}
    data.update({"ref": m.ref, "llm_path": str(m.llm_path), "mmproj_path": str(m.mmproj_path),
                 "llm_arch": llm.arch, "llm_tensors": len(llm.tensors), "mmproj_tensors": len(mmproj.tensors),
                 "size_bytes": m.size_bytes})
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    rows = [("model", m.ref), ("quant", data.get("quant") or "?"),
            ("size", f"{m.size_bytes / 1024**3:.2f} GiB"),
            ("language model", f"{m.llm_path} ({llm.arch}, {len(llm.tensors)} tensors)"),
            ("vision projector", f"{m.mmproj_path} ({data.get('mmproj_type') or '?'}, {len(mmproj.tensors)} tensors)"),
            ("source", data.get("source") or "?"), ("commit", data.get("revision") or "-"),
            ("converter", data.get("converter") or "?"),
            ("llm sha256", data.get("llm_sha256") or "-"), ("mmproj sha256", data.get("mmproj_sha256") or "-")]
    if m.manifest and m.manifest.imatrix_file:  # the manifest's own check: a plain file beside the model
        datasets = m.manifest.extra["imatrix"].get("datasets") or ["?"]
        rows.append(("imatrix", f"{m.folder / m.manifest.imatrix_file} (from {', '.join(map(str, datasets))})"))
    typer.echo("\n".join(f"{k:<17}{v}" for k, v in rows))

@app.command(epilog="Examples:\n\n  huatuo-local rm huatuo-vision-7b:q8_0\n\n"
                   "  huatuo-local rm huatuo-vision-7b:bf16   (the lossless conversion pull kept)\n\n"
                   "  huatuo-local rm huatuo-vision-7b:checkpoint   (the download pull --keep checkpoint kept)\n\n"
                   "  huatuo-local rm huatuo-vision-7b --all --yes")
def rm(
    model: Annotated[str | None, typer.Argument(help="NAME or NAME:QUANT as `huatuo-local list` shows it.")]
    = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    all_quants: Annotated[bool, typer.Option("--all", help="Every quant of NAME.")] = False,
    leftovers: Annotated[bool, typer.Option("--leftovers", help="Instead: the files an interrupted or killed "
                                            "convert or pull left in the store (doctor lists them).")] = False,
) -> None:
    """Delete a model from the local store (only files its manifest lists; the shared mmproj stays while
    another quant uses it)."""
    from huatuo_local.models.store import plan_removal, remove

    if leftovers:
        _rm_leftovers(model, yes)
        return
    if model is None:
        fail("rm: name a model (see `huatuo-local list`), or give --leftovers")

    targets, delete, kept, checkpoint = plan_removal(model, all_quants)
    size = (sum(p.stat().st_size for p in delete if p.is_file() and not p.is_symlink())
            + (checkpoint.bytes if checkpoint else 0)) / 1024**3
    names = ", ".join([m.ref for m in targets] + ([f"{model.split(':')[0]}:checkpoint"] if checkpoint else []))
    if not yes:
        if not sys.stdin.isatty():  # a script or a pipe cannot answer: deleting needs a person or --yes
            fail(f"rm {model}: would delete {names} ({size:.2f} GiB); nothing deleted: confirm in a terminal, "
                 "or add --yes")
        shown = [p.name for p in delete] + ([str(checkpoint.folder)] if checkpoint else [])
        if not typer.confirm(f"Delete {names} ({size:.2f} GiB: {', '.join(shown)})?"):
            typer.echo("nothing deleted", err=True)
            raise typer.Exit(1)
    done = remove(model, all_quants)  # type: ignore[arg-type]
    typer.echo(f"removed {', '.join(done.refs)} ({done.bytes_freed / 1024**3:.2f} GiB freed)")
    for p in done.kept:
        typer.echo(f"kept {p.name} (another quant uses it)")


def _rm_leftovers(model: str | None, yes: bool) -> None:
    from huatuo_local.models.store import leftovers, remove_leftovers

    if model is not None:
        fail("rm --leftovers takes no model name: it removes every interrupted convert's files in the store")
    found = leftovers()
    if not found:
        typer.echo("no leftovers in the store")
        return
    size = sum(p.stat().st_size for p in found) / 1024**3
    if not yes:
        if not sys.stdin.isatty():
            fail(f"rm --leftovers: would delete {len(found)} file(s) ({size:.2f} GiB); nothing deleted: confirm in a "
                 "terminal, or add --yes")
        if not typer.confirm(f"Delete {len(found)} file(s) left by interrupted converts ({size:.2f} GiB: "
                             f"{', '.join(p.name for p in found[:5])}{' ...' if len(found) > 5 else ''})?"):
            typer.echo("nothing deleted", err=True)
            raise typer.Exit(1)
    count, freed = remove_leftovers()
    typer.echo(f"removed {count} leftover file(s) ({freed / 1024**3:.2f} GiB freed)")
