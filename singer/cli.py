"""`singer <command>`: the command line of every stage and tool.

    singer synth --out data/raw --subjects 5 --seconds 6 --seed 0
    singer ingest | clip | crop | split        # each reads params.yaml, writes its outputs, validates them
    singer s3 up | down | status               # a local SeaweedFS S3 server for the DVC remote

Errors a user can act on (bad input, nothing usable left, failed validation) print one line and exit 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
s3_app = typer.Typer(no_args_is_help=True, help="A local S3 server (SeaweedFS) for the DVC remote and MLflow.")
app.add_typer(s3_app, name="s3")
console = Console(stderr=True)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="parameter file")
PresetOpt = typer.Option(None, "--preset", help="override params.yaml's preset (tiny | paper)")
SetOpt = typer.Option(None, "--set", "-S", help="override a parameter, e.g. -S crop.resolution=128")


def _load(params: Path, preset: Optional[str], overrides: Optional[list[str]]):
    from singer.config import load_config

    return load_config(params, preset=preset, overrides=overrides or [])


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=1)


def _run_stage(name: str, fn: Callable, params: Path, preset, overrides, progress: bool, validate: bool) -> None:
    from pydantic import ValidationError as ConfigError

    from singer.data.common import StageError, write_stats
    from singer.data.validate import validate_stage

    try:
        cfg = _load(params, preset, overrides)
        stats = fn(cfg, progress=progress)
        write_stats(cfg.paths.metrics, name, stats)
        if validate:
            validate_stage(name, cfg)
    except StageError as exc:
        _fail(str(exc))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(f"{name}: {exc}")
    console.print(f"[green]{name}[/] done: " + json.dumps(stats, sort_keys=True), highlight=False)


def _stage_command(name: str, import_path: str, help_text: str) -> None:
    def command(
        params: Path = ParamsOpt,
        preset: Optional[str] = PresetOpt,
        set_: Optional[list[str]] = SetOpt,
        progress: bool = typer.Option(True, help="show progress bars"),
        validate: bool = typer.Option(True, help="run the stage's Great Expectations suite"),
    ) -> None:
        module, func = import_path.rsplit(":", 1)
        fn = getattr(__import__(module, fromlist=[func]), func)
        _run_stage(name, fn, params, preset, set_, progress, validate)

    command.__doc__ = help_text
    app.command(name)(command)


_stage_command("ingest", "singer.data.ingest:run_ingest", "Probe source videos; keep the usable ones.")
_stage_command("clip", "singer.data.clip:run_clip", "Cut videos into fixed-length clips at one frame rate.")
_stage_command("crop", "singer.data.crop:run_crop", "Face crops, 68-point landmarks, masks, reference frame.")
_stage_command("split", "singer.data.split:run_split", "Train/test lists, divided by subject.")


@app.command()
def validate(
    stage: str = typer.Argument(..., help="ingest | clip | crop | split"),
    params: Path = ParamsOpt,
    preset: Optional[str] = PresetOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run one stage's Great Expectations suite on its existing output."""
    from singer.data.common import StageError
    from singer.data.validate import SUITES, validate_stage

    if stage not in SUITES:
        _fail(f"unknown stage {stage!r}; choose from {', '.join(SUITES)}")
    try:
        report = validate_stage(stage, _load(params, preset, set_))
    except StageError as exc:
        _fail(str(exc))
    console.print(f"[green]{stage}[/]: {len(report['results'])} expectations passed")


@app.command()
def synth(
    out: Optional[Path] = typer.Option(None, help="output folder (default: params paths.raw)"),
    subjects: Optional[int] = typer.Option(None, help="number of subjects (default: params synth.subjects)"),
    seconds: Optional[float] = typer.Option(None, help="seconds per take"),
    seed: Optional[int] = typer.Option(None, help="random seed"),
    size: Optional[int] = typer.Option(None, help="frame size in pixels"),
    takes: Optional[int] = typer.Option(None, help="takes per subject"),
    params: Path = ParamsOpt,
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Write a deterministic synthetic corpus of singers (mp4 + ground-truth sidecars)."""
    from singer.data.synth import synthesize_corpus

    cfg = _load(params, None, None)
    s = cfg.synth
    paths = synthesize_corpus(
        out=out or cfg.paths.raw,
        subjects=subjects if subjects is not None else s.subjects,
        seconds=seconds if seconds is not None else s.seconds,
        seed=seed if seed is not None else s.seed,
        size=size if size is not None else s.size,
        fps=list(s.fps),
        takes_per_subject=takes if takes is not None else s.takes_per_subject,
        music_level=s.music_level,
        sample_rate=s.sample_rate,
        progress=progress,
    )
    console.print(f"[green]synth[/]: wrote {len(paths)} videos under {out or cfg.paths.raw}")


@s3_app.command("up")
def s3_up(
    data_dir: Path = typer.Option(Path(".s3"), help="where the server keeps its data, log and state"),
    port: int = typer.Option(8333, help="S3 port on 127.0.0.1"),
) -> None:
    """Start SeaweedFS S3 on 127.0.0.1 in the background (credentials from AWS_* env or generated)."""
    from singer.s3server import start_server

    try:
        info = start_server(data_dir, port=port)
    except RuntimeError as exc:
        _fail(str(exc))
    console.print(f"[green]s3[/]: serving {info['endpoint_url']} (state in {data_dir})", highlight=False)


@s3_app.command("down")
def s3_down(data_dir: Path = typer.Option(Path(".s3"), help="the server's data folder")) -> None:
    """Stop the background S3 server."""
    from singer.s3server import stop_server

    stopped = stop_server(data_dir)
    console.print("[green]s3[/]: stopped" if stopped else "s3: no server was running")


@s3_app.command("status")
def s3_status(data_dir: Path = typer.Option(Path(".s3"), help="the server's data folder")) -> None:
    """Say whether the background S3 server runs, and where."""
    from singer.s3server import server_status

    status = server_status(data_dir)
    console.print(json.dumps(status, indent=2, default=str), highlight=False)
    if not status.get("running"):
        raise typer.Exit(code=3)


def main() -> None:  # python -m singer.cli
    app()


if __name__ == "__main__":
    sys.exit(main())
