"""The training loop: one code path for one CPU, many GPUs or many nodes (accelerate).

    accelerate launch --config_file infra/accelerate/cpu.yaml -m singer.train [-S train.steps=50]
    singer train                      # the same, with the profile named in params (train.accelerate_profile)

Reads the crops and the train split, builds the model of `params.yaml`'s preset with the variant's spectral
modules (`train.variant`: full | no_msm | no_sfm | no_both), and trains the `train.trainable` groups with Adam.
Every `checkpoint_every` steps `accelerator.save_state` writes `checkpoints/<variant>-<config hash>/step-N`
atomically (last `keep_last` kept locally, every one logged to MLflow unless `tracking.checkpoint_retention`
says fewer); a rerun after a crash resumes from the newest whole checkpoint of the same configuration. With
released weights (`model.pretrained`) a checkpoint holds the trainable tensors, optimizer, scheduler and RNG only:
the frozen rest is cited by the release's sha256 in its `manifest.json`, checked on resume.
`train.gradient_checkpointing` (paper: on) recomputes the UNets' activations in backward. Every `validate_every` steps the main process generates a
sample (ground truth | generated, with audio) for a test clip. At the end the model is written with
`save_pretrained` to `models/<variant>/` and `metrics/<variant>-train.json` (`metrics/train.json` for full).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from singer.config import Config
from singer.data.dataset import SingerClipDataset
from singer.io import write_json_atomic

log = logging.getLogger("singer.train")

VARIANTS = {"full": (True, True), "no_msm": (False, True), "no_sfm": (True, False), "no_both": (False, False)}


def variant_config(cfg: Config) -> Config:
    """The config with model.msm / model.sfm set by train.variant. A variant other than `full` switches
    modules off; `full` with a module switched off by hand is a contradiction and an error, so a run's
    name always says what it trained."""
    if cfg.train.variant not in VARIANTS:
        raise ValueError(f"train.variant must be one of {', '.join(VARIANTS)}, got {cfg.train.variant!r}")
    msm, sfm = VARIANTS[cfg.train.variant]
    if cfg.train.variant == "full" and not (cfg.model.msm and cfg.model.sfm):
        off = [name for name, on in (("msm", cfg.model.msm), ("sfm", cfg.model.sfm)) if not on]
        raise ValueError(f"train.variant=full but model.{'/'.join(off)} is off: use train.variant="
                         f"{'no_both' if len(off) == 2 else 'no_' + off[0]} instead")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"msm": msm, "sfm": sfm})})


def run_key(cfg: Config) -> str:
    """Checkpoints belong to one configuration and one dataset: `<variant>-<hash>` over the model, train and
    data parameters and the training data (the md5 DVC recorded for data/crops and data/split in dvc.lock,
    which DVC updates before this stage runs; the files' own sha256 outside DVC). New data never resumes
    an old run."""
    from singer.release.lineage import data_hash

    relevant = {"model": cfg.model.model_dump(mode="json"), "crop": cfg.crop.model_dump(mode="json"),
                "clip": cfg.clip.model_dump(mode="json"),
                "train": cfg.train.model_dump(mode="json", exclude={"keep_last", "validate_every", "log_every",
                                                                    "num_workers", "accelerate_profile"}),
                "data": data_hash([cfg.paths.crops, cfg.paths.split])}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.train.variant}-{digest}"


def metrics_path(cfg: Config) -> Path:
    from singer.release.lineage import stage_json

    return stage_json(cfg, "train")


def face_embeddings(dataset: SingerClipDataset, model_cfg) -> dict[str, np.ndarray]:
    """Identity embedding of every clip's reference frame, computed once (dlib: not in the training graph)."""
    from singer.faces import make_face_embedder

    embedder = make_face_embedder(model_cfg)
    return {cid: embedder.embed(dataset.reference_image(cid), what=f"clip {cid}") for cid in dataset.clip_ids}


class WithEmbeddings(torch.utils.data.Dataset):
    def __init__(self, dataset: SingerClipDataset, embeddings: dict[str, np.ndarray]):
        self.dataset, self.embeddings = dataset, embeddings

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        item["face_embedding"] = torch.from_numpy(self.embeddings[item["clip_id"]].astype(np.float32))
        return item


def sample_video(model, cfg: Config, dataset: SingerClipDataset, embeddings: dict, out: Path,
                 step: int) -> tuple[Path, Path]:
    """Generate the first `validate_frames` frames of one clip from its reference and audio; write
    reference | ground truth | generated with the audio (upscaled to be seen), and the mouth-opening plot of
    ground truth against generated. Returns (video, plot)."""
    from singer.evaluate.metrics.base import video_landmarks
    from singer.evaluate.metrics.mouth import opening_curve
    from singer.media.sample_video import write_mouth_plot, write_sample_video
    from singer.pipeline import SingerPipeline

    clip_id = dataset.clip_ids[0]
    frames, audio, reference, masks, mouth = dataset._load_frames(clip_id)
    n = min(cfg.train.validate_frames, len(frames))
    seconds = n / dataset.fps
    audio = audio[: int(round(seconds * dataset.sample_rate))]
    pipe = SingerPipeline.from_model(model, cfg.crop.resolution).set_compute(cfg.compute)  # as generation runs
    ref = {"image": reference, "masks": masks}  # full/face/lip/face_region, as prepare_reference gives
    heard = dataset.encoder_audio(clip_id)[: len(audio)]  # vocals when the clip has them; the video plays the song
    was_training = model.training
    model.eval()
    try:
        result = pipe(ref, heard, embeddings[clip_id], num_inference_steps=cfg.train.validate_inference_steps,
                      generator=torch.Generator().manual_seed(cfg.train.seed), num_frames=n, progress=False)
    finally:
        model.train(was_training)
    path = out / f"sample-step-{step:06d}.mp4"
    video = write_sample_video(path, frames[:n], result.frames, fps=dataset.fps, audio=audio,
                               sample_rate=dataset.sample_rate, reference=reference)
    truth = mouth[:n] if np.isfinite(mouth[:n]).all() else opening_curve(video_landmarks(frames[:n]))
    plot = write_mouth_plot(path.with_suffix(".png"), truth, opening_curve(video_landmarks(result.frames)),
                            title=f"{clip_id}, step {step}", fps=dataset.fps)
    return video, plot


def checkpoint_manifest(model, trainable: list[str]) -> dict:
    """What this run's checkpoints hold (singer.train.checkpoint): with released weights (`model.pretrained`),
    the trainable tensors and those no file supplied (new by design), the rest cited by the release's sha256;
    without, the whole model, as before."""
    report = getattr(model, "pretrained_report", None)
    state = model.state_dict()
    if report is None:
        return {"format": 1, "pretrained": None, "trainable": sorted(trainable), "saved": "all"}
    keep, loaded = set(trainable), set(report.loaded)
    saved = sorted(k for k in state if k in keep or k not in loaded)
    return {"format": 1, "pretrained": report.fingerprint(), "trainable": sorted(trainable), "saved": saved,
            "saved_bytes": int(sum(state[k].numel() * state[k].element_size() for k in saved)),
            "frozen_from_pretrained": len(state) - len(saved)}


def enable_gradient_checkpointing(model) -> list[str]:
    """Recompute the UNets' activations in backward (`train.gradient_checkpointing`): the denoising UNet always
    (gradients pass through it to the audio side and SFM), the reference UNet when it trains. Returns which."""
    on = ["denoising_unet"]
    model.denoising_unet.enable_gradient_checkpointing()
    if any(p.requires_grad for p in model.reference_unet.parameters()):
        model.reference_unet.enable_gradient_checkpointing()
        on.append("reference_unet")
    return on


def save_model(model, cfg: Config, target: Path) -> Path:
    """`save_pretrained` into a temporary folder, then swap it in (a reader never sees half a model)."""
    from singer.pipeline import SingerPipeline

    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    SingerPipeline.from_model(model, cfg.crop.resolution).save_pretrained(tmp, safe_serialization=True)
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def train(cfg: Config) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

    from singer.compute import accelerate_mixed_precision, compile_module, dtype_name, resolve_dtype
    from singer.models.singer import SingerModel
    from singer.release import tracking
    from singer.train import check_world_size, want_cpu
    from singer.train.checkpoint import keep_only, resume, save_checkpoint
    from singer.train.media_log import loss_plot

    cfg = variant_config(cfg)
    tc = cfg.train
    # compute.dtype -> accelerate's autocast (auto: bf16 on a bf16 GPU; fp32 on a CPU, where it did not pay for
    # training: singer/compute.py); weights and Adam stay fp32
    amp = resolve_dtype(cfg.compute.dtype, "cpu" if want_cpu() or not torch.cuda.is_available() else "cuda",
                        training=True)
    accelerator = Accelerator(
        cpu=want_cpu(),  # without it a 2-process CPU launch silently runs two separate trainings
        gradient_accumulation_steps=tc.gradient_accumulation,
        mixed_precision=accelerate_mixed_precision(amp),
        # the sampler's shuffle is part of the saved state, so a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    check_world_size(accelerator)
    set_seed(tc.seed)
    model = SingerModel.build(cfg.model, resolution=cfg.crop.resolution, fps=float(cfg.clip.fps), seed=tc.seed)
    trainable = model.set_trainable(list(tc.trainable))
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in set(trainable))
    if tc.gradient_checkpointing:
        accelerator.print(f"gradient checkpointing on {', '.join(enable_gradient_checkpointing(model))}")
    if cfg.compute.compile:  # in place: parameter names, checkpoints and the saved model are unchanged
        compile_module(model.denoising_unet)
        compile_module(model.reference_unet)
    manifest = checkpoint_manifest(model, trainable)
    if getattr(model, "pretrained_report", None) is not None:
        accelerator.print(f"pretrained {cfg.model.pretrained}: {model.pretrained_report.summary()}; checkpoints "
                          f"hold {len(manifest['saved'])} tensors ({manifest['saved_bytes'] / 2**20:.1f} MiB)")

    dataset = SingerClipDataset(cfg, "train")
    embeddings = face_embeddings(dataset, cfg.model)
    loader = DataLoader(WithEmbeddings(dataset, embeddings), batch_size=tc.batch_size, shuffle=True,
                        drop_last=len(dataset) >= tc.batch_size, num_workers=tc.num_workers,
                        generator=torch.Generator().manual_seed(tc.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=tc.lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
    # constant. A schedule with a shape (warmup, decay) would need its step counts multiplied by the number
    # of processes: accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)

    key = run_key(cfg)
    checkpoints = Path(tc.checkpoints_dir) / key
    if isinstance(manifest["saved"], list):
        keep_only(accelerator, manifest["saved"])
    state = resume(accelerator, checkpoints, manifest=manifest) or {"step": 0}
    step = int(state["step"])
    resumed_from = step
    history: list[tuple[int, float]] = [tuple(x) for x in state.get("history", [])]
    samples_dir = Path(tc.checkpoints_dir) / f"{key}-samples"
    test_split = SingerClipDataset(cfg, "test", random_windows=False) if (Path(cfg.paths.split) / "test.txt").exists() \
        else dataset
    test_embeddings = face_embeddings(test_split, cfg.model) if accelerator.is_main_process else {}

    started = time.perf_counter()
    samples = 0
    with tracking.start_run(cfg, "train", run_id=state.get("mlflow_run_id"), run_name=f"train-{tc.variant}",
                            tags={"variant": tc.variant, "run_key": key, "compute_dtype": dtype_name(amp)},
                            data_paths=[cfg.paths.crops, cfg.paths.split]) as run:
        run_id = run.info.run_id if run is not None else None
        if step:
            accelerator.print(f"resumed from {state['checkpoint']} at step {step}")
        per_epoch = max(1, len(loader) // tc.gradient_accumulation)
        epoch, skip = divmod(step, per_epoch)
        while step < tc.steps:
            dataset.epoch = epoch
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip * tc.gradient_accumulation) if skip else loader
            skip = 0
            for batch in batches:
                with accelerator.accumulate(model):
                    loss, _ = model(batch)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                samples += batch["frames"].shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                step += 1
                value = accelerator.reduce(loss.detach(), reduction="mean").item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at step {step}; stopping (last checkpoint kept)")
                history.append((step, value))
                if step % tc.log_every == 0:
                    elapsed = time.perf_counter() - started
                    tracking.log_step({"loss": value, "lr": lr_scheduler.get_last_lr()[0],
                                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                                       "samples_per_second": samples / max(elapsed, 1e-9)}, step)
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    path = save_checkpoint(accelerator, checkpoints, step, keep_last=tc.keep_last,
                                           extra={"mlflow_run_id": run_id, "epoch": epoch, "history": history},
                                           manifest=manifest)
                    if accelerator.is_main_process:
                        tracking.log_checkpoint(path, step, retention=cfg.tracking.checkpoint_retention)
                if tc.validate_every and step % tc.validate_every == 0 and accelerator.is_main_process:
                    video, plot = sample_video(accelerator.unwrap_model(model), cfg, test_split, test_embeddings,
                                               samples_dir, step)
                    tracking.log_video(video)
                    tracking.log_figure(plot, f"samples/{plot.name}")
                if step >= tc.steps:
                    break
            epoch += 1

        accelerator.wait_for_everyone()
        seconds = time.perf_counter() - started
        result = {}
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            target = save_model(unwrapped, cfg, Path(tc.models_dir) / tc.variant)
            model_id = tracking.log_model(target, max_seconds=cfg.serve.max_seconds) if cfg.tracking.log_model \
                else None
            plot = loss_plot(history, samples_dir / "loss.png", title=f"training loss ({tc.variant})")
            tracking.log_artifact(plot, "plots")
            losses = [v for _, v in history]
            tail = losses[-10:] or [float("nan")]
            result = {
                "variant": tc.variant, "steps": step, "resumed_from_step": resumed_from, "run_key": key,
                "mlflow_run_id": run_id,
                "mlflow_model_id": model_id,  # the logged model (MLflow 3): `singer register` registers this one
                "first_loss": round(losses[0], 6) if losses else None,
                "final_loss": round(float(np.mean(tail)), 6),
                "seconds": round(seconds, 2),  # this invocation's, after any resume
                "samples_per_second": round(samples / max(seconds, 1e-9), 3),
                "trainable_parameters": int(n_trainable),
                "model_dir": str(target),
            }
            write_json_atomic(metrics_path(cfg), result)
            tracking.log_step({"final_loss": result["final_loss"]}, step)
    accelerator.end_training()
    return result
