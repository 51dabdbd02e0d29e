"""`singer <command>`: the command line of every stage and tool.

    singer synth --out data/raw --subjects 5 --seconds 6 --seed 0
    singer ingest | clip | crop | split        # each reads params.yaml, writes its outputs, validates them
    singer train                               # accelerate launch ... -m singer.train
    singer generate --image face.jpg --audio song.mp3 --output out.mp4
    singer s3 up | down | status | env         # a local SeaweedFS S3 server for the DVC remote

Errors a user can act on (bad input, nothing usable left, failed validation) print one line and exit 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
s3_app = typer.Typer(no_args_is_help=True, help="A local S3 server (SeaweedFS) for the DVC remote and MLflow.")
app.add_typer(s3_app, name="s3")
console = Console(stderr=True)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="parameter file")
PresetOpt = typer.Option(None, "--preset", help="override params.yaml's preset (tiny | paper)")
SetOpt = typer.Option(None, "--set", "-S", help="override a parameter, e.g. -S crop.resolution=128")


@app.callback()
def _setup() -> None:
    # before torch loads: OpenMP threads that spin-wait slow torch 10-40x when another process shares the
    # cores (measured on 2 cores: 29 s instead of 0.7 s for the same generation); sleeping costs ~nothing
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _load(params: Path, preset: str | None, overrides: list[str] | None):
    from singer.config import load_config

    return load_config(params, preset=preset, overrides=overrides or [])


def _fail(message: str) -> None:
    """One line on stderr, exit 1. Never wrapped at the terminal's width (a wrapped line reads as several to
    a script) and never read as rich markup (a library's message may hold `[...]`)."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)
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
        preset: str | None = PresetOpt,
        set_: list[str] | None = SetOpt,
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
    preset: str | None = PresetOpt,
    set_: list[str] | None = SetOpt,
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
    out: Path | None = typer.Option(None, help="output folder (default: params paths.raw)"),
    subjects: int | None = typer.Option(None, help="number of subjects (default: params synth.subjects)"),
    seconds: float | None = typer.Option(None, help="seconds per take"),
    seed: int | None = typer.Option(None, help="random seed"),
    size: int | None = typer.Option(None, help="frame size in pixels"),
    takes: int | None = typer.Option(None, help="takes per subject"),
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


def _repo_file(relative: str) -> Path:
    """A project file (infra/...), looked up from the working directory, then beside the package."""
    here = Path(relative)
    if here.exists():
        return here
    return Path(__file__).resolve().parents[1] / relative


@app.command()
def train(
    params: Path = ParamsOpt,
    preset: str | None = PresetOpt,
    set_: list[str] | None = SetOpt,
    profile: str | None = typer.Option(None, help="infra/accelerate/<profile>.yaml (default: train.accelerate_profile)"),
    launch: bool = typer.Option(True, help="run through `accelerate launch` (--no-launch: in this process)"),
) -> None:
    """Train SINGER on the train split: `accelerate launch --config_file infra/accelerate/<profile>.yaml -m singer.train`."""
    import subprocess

    cfg = _load(params, preset, set_)
    args = ["--params", str(params)] + (["--preset", preset] if preset else [])
    for override in set_ or []:
        args += ["-S", override]
    if not launch:
        from singer.train.__main__ import main as train_main

        raise typer.Exit(code=train_main(args))
    config_file = _repo_file(f"infra/accelerate/{profile or cfg.train.accelerate_profile}.yaml")
    if not config_file.exists():
        _fail(f"accelerate profile {config_file} does not exist (see infra/accelerate/)")
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate) if accelerate.exists() else "accelerate", "launch", "--config_file", str(config_file),
           "-m", "singer.train", *args]
    console.print("[green]train[/]: " + " ".join(cmd), highlight=False)
    raise typer.Exit(code=subprocess.call(cmd))


@app.command()
def evaluate(
    params: Path = ParamsOpt,
    preset: str | None = PresetOpt,
    set_: list[str] | None = SetOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Generate every test clip and score it (Ray fan-out): eval/, metrics/eval.json, MLflow."""
    from singer.evaluate.runner import run_evaluate

    try:
        summary = run_evaluate(_load(params, preset, set_), progress=progress)
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"evaluate: {exc}")
    means = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    console.print("[green]evaluate[/] done: " + json.dumps(means, sort_keys=True, default=str), highlight=False)
    for name, reason in (summary.get("unavailable") or {}).items():
        console.print(f"  {name}: unavailable ({reason})", highlight=False)


@app.command()
def ablate(
    params: Path = ParamsOpt,
    preset: str | None = PresetOpt,
    set_: list[str] | None = SetOpt,
    variant: str | None = typer.Option(None, help="run only this variant (with --seed): one DVC ablate-run stage"),
    seed: int | None = typer.Option(None, help="the seed of that one run"),
    report: bool = typer.Option(True, help="write the table after the runs (--no-report: only the runs)"),
    report_only: bool = typer.Option(False, "--report-only", help="only the table, from the runs on disk"),
    launch: bool = typer.Option(True, help="train through `accelerate launch` (--no-launch: in this process)"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Train and evaluate full / no_msm / no_sfm / no_both with one budget; metrics/ablation.json + Table 3."""
    from singer.ablation import AblationError, markdown_table, run_all, run_single, write_report

    try:
        cfg = _load(params, preset, set_)
        if report_only:
            result = write_report(cfg)
        elif variant is not None or seed is not None:
            result = run_single(cfg, variant, seed, params, preset, set_, launch=launch, progress=progress,
                                report=report)
        else:
            result = run_all(cfg, params, preset, set_, launch=launch, progress=progress, report=report)
    except (AblationError, FileNotFoundError, ValueError) as exc:
        _fail(f"ablate: {exc}")
    if result is not None:
        typer.echo(markdown_table(result))


@app.command()
def register(
    model_dir: Path | None = typer.Option(None, help="save_pretrained folder (default: evaluate.model_dir)"),
    metrics_file: Path | None = typer.Option(None, help="evaluation metrics JSON (default: metrics/eval.json)"),
    params: Path = ParamsOpt,
) -> None:
    """Register the model training logged (else log it as an MLflow pyfunc first), with the evaluation's
    metrics, and give it the alias `challenger`."""
    from singer.release.lineage import stage_json, training_record
    from singer.release.registry import RegistryError, eval_metrics, register_model

    cfg = _load(params, None, None)
    model_dir = model_dir or cfg.evaluate.model_dir
    metrics_file = metrics_file or stage_json(cfg, "eval")
    metrics, unavailable = eval_metrics(json.loads(metrics_file.read_text())) if metrics_file.exists() else ({}, {})
    trained = training_record(cfg, model_dir) or {}
    try:
        version = register_model(cfg, model_dir, metrics=metrics, unavailable=unavailable,
                                 model_id=trained.get("mlflow_model_id"))
    except (RegistryError, FileNotFoundError) as exc:
        _fail(str(exc))
    from singer.release.tracking import resolve_tracking_uri
    from singer.urls import mlflow_ui, version_url

    uri = resolve_tracking_uri(cfg.tracking)
    console.print(f"[green]register[/]: {cfg.tracking.registered_model} version {version} is the challenger",
                  highlight=False)
    command = mlflow_ui(uri)[1]
    console.print(f"  MLflow: {version_url(uri, cfg.tracking.registered_model, version)}"
                  + (f"  (after: {command})" if command else ""), highlight=False, soft_wrap=True)


@app.command()
def release(params: Path = ParamsOpt) -> None:
    """Promote the challenger to champion if the release gate in params passes; say which metric failed."""
    from singer.release.registry import RegistryError
    from singer.release.registry import release as do_release

    try:
        result = do_release(_load(params, None, None))
    except RegistryError as exc:
        _fail(str(exc))
    if not result["passed"]:
        _fail(result["message"])
    console.print(f"[green]release[/]: {result['message']}", highlight=False)


@app.command()
def generate(
    image: Path = typer.Option(..., help="photo with exactly one face: jpg/png/webp/..., any size"),
    audio: Path = typer.Option(..., help="song: mp3, m4a, flac, ogg/opus, wav, mp4, ... any rate and channels"),
    output: Path = typer.Option(..., help="the video to write (.mp4)"),
    vocals: Path | None = typer.Option(None, help="the song's separated vocals: the model hears them (as Hallo), "
                                                  "the video plays --audio"),
    model: str = typer.Option("models/full", help="a save_pretrained folder, or models:/<name>@<alias>"),
    steps: int | None = typer.Option(None, help="denoising steps (default: the model's)"),
    guidance: float | None = typer.Option(None, help="classifier-free guidance scale"),
    sampler: str | None = typer.Option(None, help="ddim | dpm_solver | unipc (default: the model's)"),
    seed: int = typer.Option(0, help="random seed"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    paste_back: bool | None = typer.Option(None, "--paste-back/--no-paste-back",
                                           help="the face pasted back into the whole photo (default: "
                                                "generate.paste_back), or the model's face crop alone"),
    max_side: int | None = typer.Option(None, help="long side of the video in pixels (default: the photo's)"),
    separation: str | None = typer.Option(None, help="vocals the model hears: hpss | repet_sim | none | model "
                                          "(default: generate.separation; --vocals wins)"),
    separator_model: Path | None = typer.Option(None, help="a vocal separation model file (with "
                                                "--separation model)"),
    pretrained: Path | None = typer.Option(None, help="instead of --model: build the model of --preset/-S on these "
                                           "released weights (Hallo's pretrained_models/ or `singer convert`'s "
                                           "output), MSM and SFM fresh"),
    params: Path = ParamsOpt,
    preset: str | None = PresetOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Turn a portrait and a song into a video of that person singing it."""
    from pydantic import ValidationError as ConfigError
    from rich.markup import escape

    from singer.generate import GenerateError, generate_video

    overrides = list(set_ or []) + ([f"model.pretrained={pretrained}"] if pretrained else [])
    # the flags are params.yaml's generate: settings, given for one run
    flags = {"paste_back": paste_back, "max_side": max_side, "separation": separation,
             "separator_model": None if separator_model is None else str(separator_model)}
    overrides += [f"generate.{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if separator_model is not None and separation is None:
        overrides.append("generate.separation=model")
    try:  # compute.dtype / compute.compile come from params.yaml (and -S) like every other setting
        cfg = _load(params, preset, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(f"generate: {exc}")
    # asked for released weights (--pretrained or -S model.pretrained=...): the model is built from the parameters
    asked = pretrained is not None or any(o.strip().startswith("model.pretrained=") for o in set_ or [])
    config = cfg if asked else None

    def warn(message: str) -> None:
        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    try:
        info = generate_video(image, audio, output, model, steps=steps, guidance=guidance, seed=seed,
                              progress=progress, warn=warn, vocals=vocals, config=config, compute=cfg.compute,
                              sampler=sampler, settings=cfg.generate, crop=cfg.crop)
    except GenerateError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail(f"interrupted: nothing was written to {output}")
    if info.get("pretrained"):
        console.print(f"pretrained {escape(str(info['model']))}: {info['pretrained']}", highlight=False,
                      soft_wrap=True)
    console.print(f"[green]generate[/]: wrote {escape(str(output))} ({info['width']}x{info['height']}, "
                  f"{info['frames']} frames, {info['seconds']:.1f} s)", highlight=False, soft_wrap=True)


@app.command()
def convert(
    pretrained: Path = typer.Option(..., help="folder laid out like Hallo's pretrained_models/"),
    out: Path = typer.Option(Path("pretrained_models/converted"), help="where to write the converted weights"),
    dtype: str = typer.Option("float32", help="float32 | float16 | bfloat16 | keep (as stored: Hallo's net.pth is "
                              "fp16, so keep halves the output and loses nothing)"),
) -> None:
    """Map released Hallo / SINGER / SD-1.5 / AnimateDiff / wav2vec2 weights onto this model's modules."""
    import torch

    from singer.models.convert import convert_files

    if not pretrained.is_dir():
        _fail(f"{pretrained} is not a folder")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "keep": None}
    if dtype not in dtypes:
        _fail(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    report = convert_files(pretrained, out, dtype=dtypes[dtype])
    console.print(json.dumps(report if isinstance(report, dict) else {"report": str(report)}, indent=1,
                             default=str)[:4000], highlight=False)


@s3_app.command("up")
def s3_up(
    data_dir: Path = typer.Option(Path(".s3"), help="where the server keeps its data, log and state"),
    port: int = typer.Option(8333, help="S3 port on 127.0.0.1"),
    foreground: bool = typer.Option(False, help="serve until Ctrl-C instead of detaching"),
    params: Path = ParamsOpt,
) -> None:
    """Start SeaweedFS S3 on 127.0.0.1 (keys from AWS_* env, else generated) and create the bucket."""
    from singer.storage import S3ServerError, start_server

    cfg = _load(params, None, None)
    try:
        # `dvc push` does not create its bucket (DVC 3.67 stops at NoSuchBucket): make it here
        info = start_server(data_dir, port=port, background=not foreground, buckets=[cfg.s3.bucket])
    except (S3ServerError, RuntimeError) as exc:
        _fail(str(exc))
    state = "already running at" if info.get("already_running") else "serving"
    console.print(f"[green]s3[/]: {state} {info['endpoint_url']}, bucket {cfg.s3.bucket}", highlight=False)
    if info.get("credentials_file"):
        console.print(f"credentials: eval \"$(singer s3 env)\"  (or source {info['credentials_file']})",
                      highlight=False)


@s3_app.command("env")
def s3_env(data_dir: Path = typer.Option(Path(".s3"), help="the server's data folder")) -> None:
    """Print `export` lines for the server's endpoint and keys, for `eval "$(singer s3 env)"`."""
    import shlex

    from singer.storage import client_env

    lines = client_env(data_dir)
    if lines is None:
        _fail(f"no S3 server state in {data_dir}; run `singer s3 up` first")
    print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in lines.items()))


@s3_app.command("down")
def s3_down(data_dir: Path = typer.Option(Path(".s3"), help="the server's data folder")) -> None:
    """Stop the background S3 server."""
    from singer.storage import stop_server

    stopped = stop_server(data_dir)
    console.print("[green]s3[/]: stopped" if stopped else "s3: no server was running")


@s3_app.command("status")
def s3_status(data_dir: Path = typer.Option(Path(".s3"), help="the server's data folder")) -> None:
    """Say whether the background S3 server runs, and where."""
    from singer.storage import server_status

    status = server_status(data_dir)
    console.print(json.dumps(status, indent=2, default=str), highlight=False)
    if not status.get("running"):
        raise typer.Exit(code=3)


@app.command("app")
def web_app(
    params: Path = ParamsOpt,
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(7860, help="port"),
    model: str | None = typer.Option(None, help="the model the page starts with: a folder or models:/<name>@<alias>"),
) -> None:
    """The web page: upload a photo and a song (or record one), get the video (Gradio)."""
    from singer.app import serve

    try:
        serve(params, host, port, model)
    except (FileNotFoundError, OSError, ValueError) as exc:
        _fail(f"app: {exc}")


def main() -> None:  # python -m singer.cli
    app()


if __name__ == "__main__":
    sys.exit(main())
