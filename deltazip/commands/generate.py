"""`deltazip generate`: stream one completion from the base or a delta, for a quick local check."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("generate")
@click.option("--base", default=None,
              help="Base model: a name from [bases] or a HF directory (default: [build].base).")
@click.option("--delta", default=None,
              help="Delta: a name in the store, or the path of a NAME.dz artifact (default: the base alone).")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--deltas", "deltas_dir", default=None, type=click.Path(file_okay=False),
              help="Store of NAME.dz/ artifacts (default: [store].deltas).")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: no top-k cut.")
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--device", default=None, help="cpu | cuda | auto (default: [runtime].device).")
@click.pass_context
def generate(ctx: click.Context, base: str | None, delta: str | None, prompt: str, deltas_dir: str | None,
             max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
             stop: tuple[str, ...], device: str | None) -> None:
    """Generate a completion for PROMPT, streaming tokens to the terminal."""
    import dataclasses
    import tempfile

    from deltazip.commands.context import get_config
    from deltazip.runtime import Engine

    config = get_config(ctx)
    from deltazip.threads import configure_threads

    configure_threads(config.runtime.threads)  # the CPUs this process may use, or [runtime] threads
    base_dir = config.resolve_model(base or config.build.base)
    store = config.path(deltas_dir) if deltas_dir else config.path(config.store.deltas)
    runtime = config.runtime if device is None else dataclasses.replace(config.runtime, device=device)
    with tempfile.TemporaryDirectory(prefix="deltazip-generate-") as scratch:
        if delta is not None and _is_path(delta):
            delta, store = _single_store(Path(delta), Path(scratch))
        engine = Engine.from_dirs(base_dir, store, runtime)
        _run(engine, prompt, delta, max_tokens, temperature, top_p, top_k, seed, stop)


def _is_path(delta: str) -> bool:
    """A --delta value naming an artifact directory rather than a store name."""
    return "/" in delta or delta.endswith(".dz") or Path(delta).is_dir()


def _single_store(artifact: Path, scratch: Path) -> tuple[str, Path]:
    """(its name, a store holding it): the artifact's own directory when it is named NAME.dz, else a copy
    in `scratch` (a store never follows links out of itself)."""
    import shutil

    from deltazip.errors import DeltazipError
    from deltazip.format import read_manifest

    if not (artifact / "manifest.json").is_file():
        raise DeltazipError(f"--delta {artifact}: not a delta artifact (no manifest.json); give a NAME.dz "
                            "directory or the name of a delta in the store")
    name = read_manifest(artifact)["name"]
    if artifact.resolve().name == f"{name}.dz":
        return name, artifact.resolve().parent
    shutil.copytree(artifact, scratch / f"{name}.dz")
    return name, scratch


def _run(engine, prompt: str, delta: str | None, max_tokens: int, temperature: float, top_p: float,
         top_k: int, seed: int | None, stop: tuple[str, ...]) -> None:
    import time

    from deltazip.errors import DeltazipError
    from deltazip.runtime import GenerationRequest, SamplingParams
    from deltazip.ui import print_table

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=list(stop))
    start = time.perf_counter()
    engine.start()
    try:
        handle = engine.submit(GenerationRequest(prompt, delta, params),
                               on_token=lambda piece: click.echo(piece, nl=False))
        result = handle.result()
    finally:
        engine.stop()  # also ends the request on Ctrl-C
    click.echo()
    if result.finish_reason == "error":
        raise DeltazipError(result.error or "generation failed")
    seconds = time.perf_counter() - start
    print_table("generate", ["delta", "finish", "prompt tokens", "completion tokens", "seconds"],
                [[delta or "(base)", result.finish_reason, result.prompt_tokens, result.completion_tokens,
                  seconds]])
