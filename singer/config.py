"""Typed configuration read from `params.yaml`, the one source of truth for parameters.

    cfg = load_config()                      # ./params.yaml, preset from the file
    cfg = load_config("params.yaml", preset="paper", overrides=["crop.scale=0.9"])
    cfg.crop.resolution                      # -> 64 with the tiny preset

Resolution order, lowest first: the preset block (`presets.<name>`), then the sections written in the file,
then `overrides` (dotted `key=value`, values parsed as YAML, as `dvc exp run -S` does).
Unknown keys are errors, so a typo in params.yaml fails loudly instead of being ignored.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_PARAMS = "params.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Section):
    raw: Path = Path("data/raw")
    ingested: Path = Path("data/ingested")
    clips: Path = Path("data/clips")
    crops: Path = Path("data/crops")
    split: Path = Path("data/split")
    metrics: Path = Path("metrics")
    reports: Path = Path("reports")


class SynthConfig(Section):
    subjects: int = Field(5, ge=1)
    seconds: float = Field(6.0, gt=0)
    seed: int = 0
    size: int = Field(256, ge=64)
    fps: list[float] = [25.0]
    takes_per_subject: int = Field(1, ge=1)
    music_level: float = Field(0.35, ge=0)
    sample_rate: int = 44100


class IngestConfig(Section):
    sources: list[str] = []
    extensions: list[str] = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"]
    min_fps: float = 15.0
    min_duration_s: float = 2.0
    max_bytes: int = 4_000_000_000


class ClipConfig(Section):
    seconds: float = Field(2.0, gt=0)
    fps: int = Field(25, gt=0)
    sample_rate: int = 16000
    hop_seconds: float = Field(2.0, gt=0)
    min_luma: float = 25.0
    min_motion: float = 0.15
    scene_cut_threshold: float = 0.5
    crf: int = Field(12, ge=0, le=51)
    max_side: int = Field(1024, ge=64)

    @property
    def frames_per_clip(self) -> int:
        return int(round(self.seconds * self.fps))


class CropConfig(Section):
    resolution: int = Field(64, ge=16)
    scale: float = Field(0.8, gt=0, le=1.0)
    detect_max_side: int = 320
    min_face_px: int = Field(48, ge=20)       # the smallest face (dlib box side, source px) a photo or first frame is searched for
    min_face_score: float = 0.3
    second_face_ratio: float = 0.5
    max_missing_fraction: float = Field(0.2, ge=0, le=1)
    max_jitter: float = 0.08
    smooth_sigma: float = 2.0
    crf: int = Field(12, ge=0, le=51)
    redetect_every: int = Field(10, ge=1)
    detect_face_px: int = Field(100, ge=80)
    max_multi_face_fraction: float = Field(0.2, ge=0, le=1)
    workers: int = Field(0, ge=0)


class SplitConfig(Section):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class ValidateConfig(Section):
    max_fps_error: float = 0.01


class S3Config(Section):
    endpoint_url: str | None = Field("http://127.0.0.1:8333", validate_default=True)
    bucket: str = "singer"
    region: str = "us-east-1"

    @field_validator("endpoint_url")
    @classmethod
    def _env_overrides(cls, v: str | None) -> str | None:
        # A deployment points at its own S3 without editing params (which DVC tracks).
        return os.environ.get("SINGER_S3_ENDPOINT_URL", v)


class ModelConfig(Section):
    """The SINGER network (DESIGN section 3). Sizes come from the preset; see params.yaml `presets`."""

    num_frames: int = Field(8, ge=1)           # frames denoised together (a window)
    motion_frames: int = Field(2, ge=0)        # frames carried from the previous window
    # autoencoder: "pixel_shuffle" (tiny: lossless, no training) | "kl" (SD-1.5 VAE, frozen)
    autoencoder: str = "pixel_shuffle"
    autoencoder_path: str | None = None        # local folder of a diffusers AutoencoderKL (paper)
    pixel_shuffle_factor: int = 4
    latent_channels: int = 48
    block_out_channels: list[int] = [32, 64, 64]
    layers_per_block: int = 1
    attention_head_dim: int = 2
    norm_num_groups: int = 8
    cross_attention_dim: int = 64             # face tokens are projected to this width
    audio_attention_dim: int | None = None    # audio tokens' width (Hallo: 768); None: cross_attention_dim
    motion_num_heads: int = 4
    motion_max_len: int = 32
    # audio encoder: wav2vec2. `audio_encoder_path`: local folder (paper: wav2vec2-base-960h); None = random
    # init from the sizes below (tiny)
    audio_encoder_path: str | None = None
    audio_hidden_size: int = 32
    audio_layers: int = 2
    audio_heads: int = 2
    audio_intermediate_size: int = 64
    audio_conv_dim: int = 32
    audio_window: int = 2                     # +-frames of audio features per video frame
    audio_tokens: int = 32                    # tokens per frame after the audio projection
    audio_proj_dim: int = 64                  # hidden width of the audio projection MLP
    # face encoder: "dlib" (128-d, ships offline) | "insightface" (512-d ONNX, path required)
    face_encoder: str = "dlib"
    face_encoder_path: str | None = None
    face_embed_dim: int = 128
    face_tokens: int = 4
    # spectral modules (the ablation flags)
    msm: bool = True
    msm_hidden: int = 16
    sfm: bool = True
    sfm_reduction: int = 4
    # diffusion: DDIM, v-prediction, zero terminal SNR (as Hallo)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"     # Hallo trains with it (scripts/train_stage2.py:222-223)
    prediction_type: str = "v_prediction"
    inference_steps: int = 25
    # the sampler generation steps with (singer.models.scheduler.make_sampler): DDIM (Hallo's), or DPM-Solver++ /
    # UniPC (diffusers' multistep solvers, good in few steps); every one on the trained noise schedule
    sampler: Literal["ddim", "dpm_solver", "unipc"] = "ddim"
    guidance_scale: float = 3.5
    snr_gamma: float | None = 5.0             # min-SNR-gamma loss weighting (Hallo's snr_gamma); None: plain MSE
    # condition dropout in training, for classifier-free guidance (SingerModel.conditions says what a drop is):
    # the whole unconditional branch (what guidance subtracts at inference), and each half on its own (Hallo's)
    uncond_dropout: float = Field(0.05, ge=0, le=1)
    audio_dropout: float = Field(0.05, ge=0, le=1)
    reference_dropout: float = Field(0.05, ge=0, le=1)
    # weights of the audio attention under the full (background), face and lip masks (Hallo's motion_scale)
    motion_scale: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0], min_length=3, max_length=3)
    # training: how often the motion frames are replaced by the reference image, as in a song's first window
    motion_as_reference_prob: float = 0.25
    # released weights loaded by SingerModel.build (singer.models.pretrained): Hallo's pretrained_models/ folder,
    # `singer convert`'s output or a save_pretrained folder; None: every weight from its random initialisation
    pretrained: str | None = None


class TrainConfig(Section):
    variant: str = "full"                     # full | no_msm | no_sfm | no_both (sets model.msm/sfm)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(2, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    lr: float = 1e-4
    adam_betas: list[float] = [0.9, 0.999]
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    trainable: list[str] = ["all"]           # module names, or "all"
    checkpoint_every: int = 50
    keep_last: int = 3                         # local checkpoints kept; MLflow keeps every one
    validate_every: int = 100
    validate_frames: int = 16                 # frames of the sample video generated at each validation
    validate_inference_steps: int = 10
    num_workers: int = 0
    accelerate_profile: str = "cpu"           # infra/accelerate/<profile>.yaml
    models_dir: Path = Path("models")
    checkpoints_dir: Path = Path("checkpoints")
    log_every: int = 1
    gradient_checkpointing: bool = False      # on the UNets (paper: True); recomputes activations in backward

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mixed_precision" in data:
            raise ValueError("train.mixed_precision moved to compute.dtype (auto | fp32 | bf16 | fp16), which "
                             "training, evaluation and generation share")
        return data


class EvaluateConfig(Section):
    """`singer evaluate`: generate every test clip from its reference frame and audio, then score it."""

    model_dir: Path = Path("models/full")
    out_dir: Path = Path("eval")               # per-clip table, plots, sample videos
    max_clips: int | None = None              # None: every test clip
    inference_steps: int = 25
    guidance_scale: float | None = None       # None: the model's
    sampler: Literal["ddim", "dpm_solver", "unipc"] | None = None  # None: the model's (model.sampler)
    seed: int = 0
    num_workers: int = 2                      # Ray tasks at once (local); RAY_ADDRESS for a cluster
    metrics: list[str] = ["ssim", "psnr", "cpbd", "lmd", "diversity", "bas", "identity", "mouth_correlation",
                          "mouth_width_correlation", "fvd", "lse"]
    identity_max_frames: int = 8               # dlib embeddings are ~0.25 s a frame
    cpbd_every: int = 1
    i3d_path: str | None = None               # FVD weights (SINGER_I3D_PATH wins when set); absent: unavailable
    i3d_bn_eps: float | None = None           # None: the weights' format decides (state dict 1e-5, TorchScript its own)
    fvd_clips_per_video: int | None = 1       # 16-frame clips per video for FVD (the common code: 1); None: all
    syncnet_path: str | None = None           # LSE weights (SINGER_SYNCNET_PATH)
    sample_videos: int = 3                    # side-by-side videos logged to MLflow
    # a control: generate from another test clip's audio (of another subject when there is one) or from
    # silence, and score against the clip's own ground truth (does the audio, not the reference, drive it?)
    audio_control: Literal["none", "shuffled", "silent"] = "none"


class ComputeConfig(Section):
    """How the networks compute (singer/compute.py), in training, evaluation and generation."""

    # auto: bf16 autocast where it pays (a bf16 GPU; generation on a CPU with AMX / AVX512-BF16; CPU training
    # stays fp32), fp32 elsewhere; fp32: the exact path. Weights and optimizer state stay fp32 either way.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False                     # torch.compile (inductor) the UNets; the first call compiles


class GenerateConfig(Section):
    """`singer generate`, `singer app` and the served model: a user's photo and song -> a video.

    The face is found with `crop`'s detector settings (crop.min_face_px is the smallest face looked for)."""

    paste_back: bool = True                   # the generated face pasted back into the whole photo
    max_side: int | None = Field(None, ge=64)  # long side of the output video; None: the photo's own
    feather: float = Field(0.1, gt=0, le=0.5)  # width of the paste-back mask's soft edge, fraction of the crop
    loudness_lufs: float | None = -23.0       # ITU-R BS.1770 loudness the audio encoder hears; None: as given
    # vocals the audio encoder hears (as Hallo separates them): none | hpss | repet_sim (librosa, offline) |
    # model (separator_model: an audio-separator / demucs model file on disk, loaded only when set)
    separation: Literal["none", "hpss", "repet_sim", "model"] = "hpss"
    separator_model: str | None = None
    max_seconds: float = Field(900.0, gt=0)   # the longest song accepted


class ServeConfig(Section):
    """The MLflow pyfunc behind `mlflow models serve`."""

    max_seconds: float = Field(60.0, gt=0)    # longer songs are refused with a 400


class ReleaseConfig(Section):
    """`singer release`: the challenger becomes champion only if every gate passes against the champion."""

    # metric -> largest allowed regression against the champion (in the metric's own units; direction known)
    gate: dict[str, float] = {"lmd": 0.0, "mouth_correlation": 0.0, "ssim": 0.01}
    require_metrics: list[str] = ["lmd", "mouth_correlation"]
    # metric -> worst value released at all (minimum, or maximum for lower-is-better), the first release too
    floor: dict[str, float] = {}


class AblateConfig(Section):
    """`singer ablate`: the spectral-module variants trained and evaluated with one budget (Table 3)."""

    variants: list[str] = ["full", "no_msm", "no_sfm", "no_both"]
    seeds: list[int] = [0]                    # every variant is trained and evaluated once per seed
    steps: int | None = None                  # training steps of every run; None: train.steps
    max_clips: int | None = None              # test clips per run; None: evaluate.max_clips
    inference_steps: int | None = None        # sampling steps; None: evaluate.inference_steps
    sample_videos: int = 1
    out_dir: Path = Path("ablation")          # <out_dir>/<variant>-s<seed>/{models,metrics,eval}


class TrackingConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI wins when set
    artifact_location: str = "./mlartifacts"
    experiment: str = "singer"
    registered_model: str = "singer"
    # checkpoints kept in MLflow per run: None keeps every one; N deletes all but the newest N (where the
    # artifact store can delete; where it cannot, every one is kept and a warning says so)
    checkpoint_retention: int | None = Field(None, ge=1)
    # the training run logs models/<variant>/ as its MLflow logged model, the one `singer register` registers
    # (false: not; at paper scale that is 10 GB a run, and `singer register` then logs the folder itself)
    log_model: bool = True


class Config(Section):
    preset: str = "tiny"
    paths: PathsConfig = PathsConfig()
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    clip: ClipConfig = ClipConfig()
    crop: CropConfig = CropConfig()
    split: SplitConfig = SplitConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    s3: S3Config = S3Config()
    model: ModelConfig = ModelConfig()
    compute: ComputeConfig = ComputeConfig()
    generate: GenerateConfig = GenerateConfig()
    serve: ServeConfig = ServeConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    release: ReleaseConfig = ReleaseConfig()
    ablate: AblateConfig = AblateConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def deep_merge(base: dict, update: dict) -> dict:
    """Recursively merge `update` into a copy of `base` (dicts merge, everything else is replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(tree: dict, override: str) -> dict:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested dict, in place."""
    if "=" not in override:
        raise ValueError(f"override {override!r} is not of the form key.path=value")
    dotted, raw = override.split("=", 1)
    node = tree
    *parents, leaf = dotted.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)
    return tree


def resolve_params(raw: dict, preset: str | None = None, overrides: list[str] | None = None) -> dict:
    """The effective parameter tree: preset block, then file sections, then overrides."""
    raw = copy.deepcopy(raw or {})
    presets = raw.pop("presets", {}) or {}
    for override in overrides or []:
        apply_override(raw, override)
    name = preset or raw.get("preset", "tiny")
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; params.yaml defines {sorted(presets) or 'none'}")
    merged = deep_merge(presets[name], raw)
    merged["preset"] = name
    return merged


def load_config(
    path: str | os.PathLike = DEFAULT_PARAMS,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Read params.yaml into a `Config`. A missing file gives the built-in defaults of the tiny preset."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {}
    elif path.name != DEFAULT_PARAMS or path.parent != Path("."):
        raise FileNotFoundError(f"parameter file {path} does not exist")
    raw.setdefault("presets", {}).setdefault("tiny", {})
    return Config.model_validate(resolve_params(raw, preset, overrides))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used to log parameters."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
