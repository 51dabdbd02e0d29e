"""Inception-I3D (Carreira and Zisserman 2017), Kinetics-400 head, for FVD.

Written for this project; the layer layout and the state-dict names follow the common PyTorch port
(piergiaj/pytorch-i3d, `pytorch_i3d.py`), whose Kinetics-400 weights circulate as
`i3d_pretrained_400.pt` (StyleGAN-V / DIGAN / TATS FVD code). Keys therefore look like
``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``, ``Mixed_3b.b1b.conv3d.weight``,
``logits.conv3d.weight`` / ``logits.conv3d.bias``. Convolutions use TensorFlow "SAME" padding computed
from the input size at run time.

Batch-norm eps moves FVD, and two conventions exist for the same weights: 1e-3 in the piergiaj port (as in
TensorFlow/Sonnet's I3D), 1e-5 in the VideoGPT/TATS copy of that port, for which `i3d_pretrained_400.pt` was
converted and which produced most published PyTorch FVDs. The class defaults to the port's 1e-3; `load_i3d`
gives a state-dict file 1e-5 (what that file was made for) unless told otherwise. A TorchScript file keeps
the eps it was exported with.

Input: (N, 3, T, 224, 224) in [-1, 1], RGB. `forward` returns the pre-softmax Kinetics logits of the
final 1x1x1 `logits` convolution after the 2x7x7 average pool, averaged over the remaining time axis
(length 1 for T = 16 at 224²): (N, num_classes). These 400-d logits are the FVD features.

No weights ship with the code: `load_i3d` loads a user file (state dict, or a TorchScript file such as
StyleGAN-V's `i3d_torchscript.pt`) or raises `WeightsUnavailable` with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ENV_VAR = "SINGER_I3D_PATH"
PORT_BN_EPS = 1e-3  # piergiaj/pytorch-i3d, TF/Sonnet
STATE_DICT_BN_EPS = 1e-5  # VideoGPT / TATS, the code i3d_pretrained_400.pt was converted for


class WeightsUnavailable(RuntimeError):
    """The user-supplied weights are missing or do not fit the network; the message says why."""


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis (front, back) as the port computes it."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = x.shape[2:]
    pt, ph, pw = (_same_pad(s, k, st) for s, k, st in zip((t, h, w), kernel, stride))
    return F.pad(x, (pw[0], pw[1], ph[0], ph[1], pt[0], pt[1]))


class MaxPool3dSame(nn.Module):
    """Max pooling with SAME padding (zeros, as the port pads with F.pad before nn.MaxPool3d)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class Unit3D(nn.Module):
    """Conv3d (no bias unless asked) + BatchNorm3d (eps: see the module docstring) + ReLU, SAME padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        activation: Callable[[torch.Tensor], torch.Tensor] | None = F.relu,
        batch_norm: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=PORT_BN_EPS, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return self.activation(x) if self.activation is not None else x


class InceptionModule(nn.Module):
    """Four branches: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1; concatenated."""

    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a = Unit3D(in_channels, out[1])
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3])
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, out[5])
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


# (name, inception branch widths) in order; the port's channel table.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class InceptionI3d(nn.Module):
    """Inception-v1 I3D; `width` < 1 scales every channel count (a fast test variant only: real weights
    need width 1)."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3, width: float = 1.0):
        super().__init__()

        def c(n: int) -> int:
            return max(1, int(round(n * width)))

        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(in_channels, c(64), (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(c(64), c(64))
        self.Conv3d_2c_3x3 = Unit3D(c(64), c(192), (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = c(192)
        pools = {"Mixed_4b": ((3, 3, 3), (2, 2, 2)), "Mixed_5b": ((2, 2, 2), (2, 2, 2))}
        self._order: list[str] = [
            "Conv3d_1a_7x7",
            "MaxPool3d_2a_3x3",
            "Conv3d_2b_1x1",
            "Conv3d_2c_3x3",
            "MaxPool3d_3a_3x3",
        ]
        for name, widths in _MIXED.items():
            if name in pools:
                pool_name = "MaxPool3d_4a_3x3" if name == "Mixed_4b" else "MaxPool3d_5a_2x2"
                setattr(self, pool_name, MaxPool3dSame(*pools[name]))
                self._order.append(pool_name)
            module = InceptionModule(channels, tuple(c(w) for w in widths))
            setattr(self, name, module)
            self._order.append(name)
            channels = module.out_channels
        self.dropout = nn.Dropout(0.5)  # identity in eval mode; kept for parity with the port
        self.logits = Unit3D(channels, num_classes, activation=None, batch_norm=False, bias=True)
        self.bn_eps = PORT_BN_EPS

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c output (N, 1024, T/8, H/32, W/32)."""
        for name in self._order:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) in [-1, 1] -> (N, num_classes) pre-softmax logits (time-averaged)."""
        x = self.features(x)
        # The port's nn.AvgPool3d(kernel (2, 7, 7), stride 1): exact for 224² input; shrink the kernel
        # only when the map is smaller (short clips or small test inputs).
        k = (min(2, x.shape[2]), min(7, x.shape[3]), min(7, x.shape[4]))
        x = F.avg_pool3d(x, k, stride=1)
        x = self.logits(self.dropout(x))  # (N, C, T', H', W')
        return x.mean(dim=(2, 3, 4))


def _unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailable("the file holds no state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


class TorchScriptI3D(nn.Module):
    """A TorchScript I3D (StyleGAN-V's `i3d_torchscript.pt`), called as the FVD code does:
    ``detector(x, rescale=False, resize=False, return_features=True)`` on [-1, 1] input -> (N, 400)."""

    bn_eps = None  # as exported

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.scripted = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scripted(x, rescale=False, resize=False, return_features=True)
        return out.reshape(out.shape[0], -1)


def resolve_path(path: str | os.PathLike | None, env_var: str = ENV_VAR) -> Path | None:
    if path is None:
        path = os.environ.get(env_var) or None
    return Path(path).expanduser() if path is not None else None


def set_bn_eps(model: nn.Module, eps: float) -> nn.Module:
    """Every batch norm of `model` at `eps`; `model.bn_eps` records it (FVD reports it)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.eps = float(eps)
    model.bn_eps = float(eps)
    return model


def load_i3d(path: str | os.PathLike | None = None, num_classes: int = 400,
             bn_eps: float | None = None) -> nn.Module:
    """The user's I3D in eval mode: `path`, else `$SINGER_I3D_PATH`.

    A state dict (`torch.load(weights_only=True)`, strict key match against `InceptionI3d`), its batch norms
    at `bn_eps` (None: `STATE_DICT_BN_EPS`, what i3d_pretrained_400.pt was made for), or a TorchScript file
    (name ending in `torchscript.pt`, or any file that is no loadable state dict), which keeps its own eps
    (`bn_eps` must then be None). Raises `WeightsUnavailable` with the reason otherwise; never returns a
    randomly initialised network. The result's `bn_eps` says which eps it runs with (None: as exported).
    """
    p = resolve_path(path)
    if p is None:
        raise WeightsUnavailable(f"no I3D weights given (pass a path or set {ENV_VAR})")
    if not p.is_file():
        raise WeightsUnavailable(f"I3D weights not found at {p} (set {ENV_VAR})")
    if p.name.endswith("torchscript.pt"):
        return _load_torchscript(p, bn_eps)
    try:
        state = _unwrap_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    except Exception as exc:  # not a plain state dict: maybe TorchScript
        try:
            return _load_torchscript(p, bn_eps)
        except WeightsUnavailable:
            raise WeightsUnavailable(
                f"I3D weights at {p} are neither a state dict nor TorchScript: {exc}"
            ) from exc
    model = InceptionI3d(num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        head = str(exc).splitlines()[0:3]
        raise WeightsUnavailable(
            f"I3D weights at {p} do not match InceptionI3d: {' '.join(head)[:500]}"
        ) from exc
    return set_bn_eps(model, STATE_DICT_BN_EPS if bn_eps is None else bn_eps).eval()


def _load_torchscript(p: Path, bn_eps: float | None = None) -> nn.Module:
    if bn_eps is not None:
        raise ValueError(f"{p} is a TorchScript I3D, which keeps the batch-norm eps it was exported with: "
                         "leave evaluate.i3d_bn_eps null")
    try:
        scripted = torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:
        raise WeightsUnavailable(f"cannot load TorchScript I3D at {p}: {exc}") from exc
    return TorchScriptI3D(scripted).eval()
