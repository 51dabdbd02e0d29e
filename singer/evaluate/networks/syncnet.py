"""SyncNet (Chung and Zisserman 2016), the "S" model of joonson/syncnet_python, for LSE-D / LSE-C.

Written for this project; layers and state-dict names follow syncnet_python's `SyncNetModel.py`
(class `S`), whose weights are `syncnet_v2.model` (a plain state dict: the reference's
`loadParameters` reads it with `torch.load(..., weights_only=True)` and copies it name by name).
Keys: ``netcnnaud.<i>.*`` (audio CNN), ``netfcaud.<i>.*``, ``netcnnlip.<i>.*`` (video CNN),
``netfclip.<i>.*``, the Sequential indices matching the reference.

- audio: (B, 1, 13, 20) MFCCs (13 coefficients x 20 frames at 100 Hz = 0.2 s) -> (B, 1024)
- video: (B, 3, 5, 224, 224) five consecutive frames, raw 0-255 BGR values (the reference feeds
  `cv2.imread` images as floats, unnormalised) -> (B, 1024)
"""

from __future__ import annotations

import os

import torch
from torch import nn

from singer.evaluate.networks.i3d import WeightsUnavailable, _unwrap_state_dict, resolve_path

ENV_VAR = "SINGER_SYNCNET_PATH"


class SyncNet(nn.Module):
    def __init__(self, embed_dim: int = 1024):
        super().__init__()
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, (3, 3), (1, 1), (1, 1)),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d((1, 1), (1, 1)),
            nn.Conv2d(64, 192, (3, 3), (1, 1), (1, 1)),
            nn.BatchNorm2d(192),
            nn.ReLU(inplace=True),
            nn.MaxPool2d((3, 3), (1, 2)),
            nn.Conv2d(192, 384, (3, 3), padding=(1, 1)),
            nn.BatchNorm2d(384),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, (3, 3), padding=(1, 1)),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, (3, 3), padding=(1, 1)),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool2d((3, 3), (2, 2)),
            nn.Conv2d(256, 512, (5, 4), padding=(0, 0)),
            nn.BatchNorm2d(512),
            nn.ReLU(),
        )
        self.netfcaud = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim)
        )
        self.netfclip = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim)
        )
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2), 0),
            nn.BatchNorm3d(96),
            nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)),
            nn.BatchNorm3d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(256),
            nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(256),
            nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(256, 512, (1, 6, 6), padding=0),
            nn.BatchNorm3d(512),
            nn.ReLU(inplace=True),
        )

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 13, 20) MFCC windows -> (B, 1024)."""
        mid = self.netcnnaud(x)
        return self.netfcaud(mid.reshape(mid.shape[0], -1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 5, 224, 224) frame windows -> (B, 1024)."""
        mid = self.netcnnlip(x)
        return self.netfclip(mid.reshape(mid.shape[0], -1))

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_lip(video), self.forward_aud(audio)


def load_syncnet(path: str | os.PathLike | None = None) -> SyncNet:
    """The user's SyncNet in eval mode: `path`, else `$SINGER_SYNCNET_PATH`.

    Only state dicts are read (`weights_only=True`); a file holding a whole pickled model (some
    syncnet_python versions) is refused with a reason rather than unpickled: re-save it as
    ``torch.save(model.state_dict(), ...)``. Raises `WeightsUnavailable` with the reason.
    """
    p = resolve_path(path, ENV_VAR)
    if p is None:
        raise WeightsUnavailable(f"no SyncNet weights given (pass a path or set {ENV_VAR})")
    if not p.is_file():
        raise WeightsUnavailable(f"SyncNet weights not found at {p} (set {ENV_VAR})")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(
            f"SyncNet weights at {p} are not a plain state dict (a pickled model is not unpickled; "
            f"re-save its state_dict()): {str(exc).splitlines()[0][:300]}"
        ) from exc
    state = _unwrap_state_dict(obj)
    # The reference's `loadParameters` copies names into `SyncNetInstance.__S__`; files saved from the
    # instance carry that prefix.
    state = {k.split("__S__.", 1)[-1]: v for k, v in state.items()}
    model = SyncNet()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsUnavailable(
            f"SyncNet weights at {p} do not match syncnet_python's S model: {str(exc).splitlines()[0][:300]}"
        ) from exc
    return model.eval()


__all__ = ["ENV_VAR", "SyncNet", "WeightsUnavailable", "load_syncnet"]
