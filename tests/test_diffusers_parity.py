"""Parity with diffusers where diffusers has the same part (issue 14): same random weights, same inputs,
outputs equal to float32 round-off (1e-5).

* ``UNet2DConditionModel`` (the SD-1.5 layout) vs ``ReferenceUNet2D`` (its attn1 inputs = diffusers' ``norm1``
  outputs of every ``BasicTransformerBlock``) and vs ``DenoisingUNet3D`` without motion/audio modules and SFM
  (the prediction for one frame, and for several frames folded into the batch).
* AnimateDiff: a ``MotionAdapter`` motion module (``AnimateDiffTransformer3D``) vs ``MotionModule``, and a
  whole ``UNetMotionModel.from_unet2d(unet, adapter)`` vs ``DenoisingUNet3D`` with motion modules. Their
  weights go through diffusers' own AnimateDiff -> diffusers key conversion
  (``diffusers.loaders.single_file_utils.convert_animatediff_checkpoint_to_diffusers``), mirrored in
  ``animatediff_to_diffusers_key``.

One deliberate difference: diffusers' ``AnimateDiffTransformer3D`` applies its GroupNorm to the 5-D
``(B, C, F, H, W)`` tensor, with statistics over all frames of a clip, while AnimateDiff's and Hallo's
``TemporalTransformer3DModel`` (``hallo/models/motion_module.py``) normalise each frame alone
(``rearrange(x, "b c f h w -> (b f) c h w")`` before ``self.norm``): the released weights were trained that
way, and ``MotionModule`` does the same. The parity tests switch diffusers' motion norms to per-frame
statistics (``per_frame_motion_norms``); ``test_diffusers_motion_norm_spans_frames`` checks the difference.

Sizes: channels (32, 64, 64) with GroupNorm 8 groups and 2 heads (2D tests), (32, 64) with 32 groups (motion
tests: AnimateDiff's and Hallo's motion GroupNorm has 32); 16-wide face tokens; latents 8x8 and an odd 7x10
(the upsamplers then take the skips' sizes).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from einops import rearrange
from torch import nn

from singer.models.motion_module import MotionModule, PositionalEncoding
from singer.models.unet_denoising import DenoisingUNet3D
from singer.models.unet_reference import ReferenceUNet2D

ATOL = 1e-5
CROSS_DIM, N_FACE = 16, 5
CHANNELS_2D, GROUPS_2D, HEADS_2D = (32, 64, 64), 8, 2
CHANNELS_MM, GROUPS_MM, HEADS_MM, MOTION_HEADS, MAX_LEN = (32, 64), 32, 2, 2, 24
SIZES = [(8, 8), (7, 10)]


# ---------------------------------------------------------------------------------------------------------
# helpers


def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Make every parameter informative: every 1-D tensor + 0.1·N(0,1) (norm weights 1 + 0.1·N(0,1), biases),
    zero-initialised matrices (AnimateDiff's proj_out) N(0, 1/fan_in). Returns ``module`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> float:
    """The max abs difference, asserted under ``atol`` (the expected values must not be trivially small)."""
    d, scale = max_diff(got, expected), expected.abs().max().item()
    assert scale > 1e-2, f"{what}: degenerate expected values"
    assert d < atol, f"{what}: max abs difference {d:.3g} (|expected| up to {scale:.3g})"
    return d


def animatediff_to_diffusers_key(key: str) -> str | None:
    """An AnimateDiff / Hallo motion-module key (``...motion_modules.k.temporal_transformer.*``) -> the key of
    diffusers' ``UNetMotionModel`` / ``MotionAdapter``, or None for the positional tables (``pos_encoder.pe``;
    diffusers computes its own, ``transformer_blocks.k.pos_embed.pe``). Mirrors diffusers'
    ``convert_animatediff_checkpoint_to_diffusers`` (``test_key_mapping_mirrors_diffusers``)."""
    if "pos_encoder" in key:
        return None
    for old, new in (
        (".norms.0", ".norm1"),
        (".norms.1", ".norm2"),
        (".ff_norm", ".norm3"),
        (".attention_blocks.0", ".attn1"),
        (".attention_blocks.1", ".attn2"),
        (".temporal_transformer", ""),
    ):
        key = key.replace(old, new)
    return key


def load_from_diffusers(ours: nn.Module, theirs: dict[str, torch.Tensor], prefix: str = "",
                        may_be_absent: tuple[str, ...] = ()) -> None:
    """Copy a diffusers state dict into ``ours`` (whose keys, after ``prefix``, are AnimateDiff's / Hallo's):
    motion-module keys through ``animatediff_to_diffusers_key``, the others by name. Asserts that every tensor
    of ours is loaded but the positional tables (compared on their own), and that every diffusers tensor is
    used but its positional tables and those under ``may_be_absent``."""
    mapped, used = {}, set()
    for key in ours.state_dict():
        full = prefix + key
        source = animatediff_to_diffusers_key(full) if ".motion_modules." in full else full
        if source is None:
            continue
        assert source in theirs, f"{key} -> {source}: not in the diffusers state dict"
        mapped[key] = theirs[source]
        used.add(source)
    unused = sorted(
        k for k in set(theirs) - used
        if k.startswith(prefix) and not k.endswith("pos_embed.pe") and not k.startswith(may_be_absent)
    )
    assert not unused, f"diffusers tensors with no counterpart: {unused}"
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("pos_encoder.pe") for k in missing), missing


class _PerFrameGroupNorm(nn.GroupNorm):
    """diffusers' motion-module GroupNorm with AnimateDiff's / Hallo's per-frame statistics: (B, C, F, H, W)
    in and out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(rearrange(x, "b c f h w -> (b f) c h w"))
        return rearrange(y, "(b f) c h w -> b c f h w", f=x.shape[2])


@contextlib.contextmanager
def per_frame_motion_norms(model: nn.Module):
    """Within the block, the GroupNorm of every ``AnimateDiffTransformer3D`` in ``model`` (``model`` itself
    included) normalises each frame alone (same parameters). Yields how many were switched."""
    norms = [m.norm for m in model.modules() if type(m).__name__ == "AnimateDiffTransformer3D"]
    for norm in norms:
        norm.__class__ = _PerFrameGroupNorm
    try:
        yield len(norms)
    finally:
        for norm in norms:
            norm.__class__ = nn.GroupNorm


def tiny_unet2d(seed: int, channels=CHANNELS_2D, groups=GROUPS_2D, heads=HEADS_2D) -> UNet2DConditionModel:
    """diffusers' SD-1.5 layout at a tiny size (cross-attention blocks everywhere but the last down and the
    first up block), random weights; ``attention_head_dim`` is, as in SD-1.5's config, the NUMBER of heads."""
    n = len(channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=heads,
        norm_num_groups=groups,
    )
    return randomise_(unet, seed + 1)


def our_kwargs(channels=CHANNELS_2D, groups=GROUPS_2D, heads=HEADS_2D) -> dict:
    return dict(in_channels=4, block_out_channels=channels, layers_per_block=1, attention_head_dim=heads,
                norm_num_groups=groups, cross_attention_dim=CROSS_DIM)


def no_temporal(**kwargs) -> DenoisingUNet3D:
    """Our denoising UNet without motion modules, audio modules and SFM: the 2D UNet run per frame."""
    return DenoisingUNet3D(out_channels=4, use_motion_modules=False, use_audio_modules=False, use_sfm=False,
                           **our_kwargs(**kwargs)).eval()


def with_motion(use_motion_modules: bool = True) -> DenoisingUNet3D:
    return DenoisingUNet3D(out_channels=4, use_motion_modules=use_motion_modules, use_audio_modules=False,
                           use_sfm=False, motion_num_heads=MOTION_HEADS, motion_max_len=MAX_LEN,
                           **our_kwargs(CHANNELS_MM, GROUPS_MM, HEADS_MM)).eval()


def attention_heads(model: nn.Module) -> list[int]:
    return [m.heads for name, m in model.named_modules() if name.endswith((".attn1", ".attn2"))]


def inputs_2d(n: int, size: tuple[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(n, 4, *size, generator=g)
    timesteps = torch.randint(0, 1000, (n,), generator=g)
    faces = torch.randn(n, N_FACE, CROSS_DIM, generator=g)
    return sample, timesteps, faces


@pytest.fixture(scope="module")
def unet2d():
    return tiny_unet2d(seed=0)


# ---------------------------------------------------------------------------------------------------------
# the 2D path: UNet2DConditionModel


@pytest.mark.parametrize("size", SIZES)
def test_reference_unet_attn1_inputs_match_diffusers_norm1(unet2d, size):
    ref = ReferenceUNet2D(**our_kwargs()).eval()
    theirs = unet2d.state_dict()
    head = {k for k in theirs if k.startswith(("conv_norm_out.", "conv_out."))}
    assert len(head) == 4  # the reference UNet has no output head; every other tensor maps by name
    ref.load_state_dict({k: v for k, v in theirs.items() if k not in head}, strict=True)

    names = ref.attention_layer_names()
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        unet2d.get_submodule(f"{name}.transformer_blocks.0.norm1").register_forward_hook(
            lambda _module, _args, out, name=name: captured.__setitem__(name, out)
        )
        for name in names
    ]
    sample, timesteps, faces = inputs_2d(3, size, seed=1)
    try:
        with torch.no_grad():
            unet2d(sample, timesteps, encoder_hidden_states=faces)
            states = ref(sample, timesteps, face_tokens=faces)
    finally:
        for hook in hooks:
            hook.remove()
    assert list(captured) == names == list(states)  # the same layers, in the same (execution) order
    d = max(assert_close(states[name], captured[name], name) for name in names)
    print(f"reference UNet attn1 inputs vs diffusers norm1 outputs {size}: max abs diff {d:.2e}")


@pytest.mark.parametrize("size", SIZES)
def test_denoising_unet_without_temporal_modules_matches_unet2d(unet2d, size):
    den = no_temporal()
    den.load_state_dict(unet2d.state_dict(), strict=True)  # every tensor, by name
    sample, timesteps, faces = inputs_2d(2, size, seed=2)
    with torch.no_grad():
        expected = unet2d(sample, timesteps, encoder_hidden_states=faces).sample
        got = den(sample.unsqueeze(2), timesteps, face_tokens=faces)[:, :, 0]  # F = 1
    d = assert_close(got, expected, "prediction, F=1")
    print(f"denoising UNet (F=1) vs UNet2DConditionModel {size}: max abs diff {d:.2e}")


def test_denoising_unet_frames_are_the_2d_unet_per_frame(unet2d):
    """F > 1 without temporal modules: each frame is the 2D UNet on that frame with its sample's timestep and
    face tokens (frames folded into the batch; time embedding and face tokens shared by a sample's frames)."""
    den = no_temporal()
    den.load_state_dict(unet2d.state_dict(), strict=True)
    b, f = 2, 3
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(b, 4, f, 8, 8, generator=g)
    timesteps = torch.tensor([17, 803])
    faces = torch.randn(b, N_FACE, CROSS_DIM, generator=g)
    with torch.no_grad():
        got = den(sample, timesteps, face_tokens=faces)
        expected = unet2d(rearrange(sample, "b c f h w -> (b f) c h w"), timesteps.repeat_interleave(f),
                          encoder_hidden_states=faces.repeat_interleave(f, dim=0)).sample
    d = assert_close(rearrange(got, "b c f h w -> (b f) c h w"), expected, "prediction, F=3")
    print(f"denoising UNet (F=3) vs UNet2DConditionModel per frame: max abs diff {d:.2e}")


def test_attention_head_dim_is_the_number_of_heads(unet2d):
    """Both read ``attention_head_dim`` as the number of heads (SD-1.5's config), and the comparison above
    sees it: the same weights split into another number of heads give another prediction."""
    assert set(attention_heads(no_temporal())) == set(attention_heads(unet2d)) == {HEADS_2D}
    assert len(attention_heads(no_temporal())) == len(attention_heads(unet2d))
    other = no_temporal(heads=2 * HEADS_2D)
    other.load_state_dict(unet2d.state_dict(), strict=True)
    sample, timesteps, faces = inputs_2d(2, (8, 8), seed=4)
    with torch.no_grad():
        expected = unet2d(sample, timesteps, encoder_hidden_states=faces).sample
        wrong = other(sample.unsqueeze(2), timesteps, face_tokens=faces)[:, :, 0]
    assert max_diff(wrong, expected) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# AnimateDiff motion modules: MotionAdapter


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(10)
    mm = MotionAdapter(block_out_channels=CHANNELS_MM, motion_layers_per_block=1,
                       motion_num_attention_heads=MOTION_HEADS, motion_norm_num_groups=GROUPS_MM,
                       motion_max_seq_length=MAX_LEN)
    return randomise_(mm, 11)


MM_PREFIX = "down_blocks.1.motion_modules.0."  # the adapter's 64-channel motion module


def one_motion_module(adapter) -> tuple[nn.Module, MotionModule]:
    """diffusers' ``down_blocks.1.motion_modules.0`` and ours with its weights (mapped as Hallo's keys)."""
    theirs = adapter.get_submodule(MM_PREFIX.rstrip("."))
    ours = MotionModule(CHANNELS_MM[1], MOTION_HEADS, MAX_LEN, GROUPS_MM).eval()
    load_from_diffusers(ours, adapter.state_dict(), prefix=MM_PREFIX)
    return theirs, ours


def test_key_mapping_mirrors_diffusers():
    """``animatediff_to_diffusers_key`` is diffusers' conversion on our (AnimateDiff v2 / Hallo) key names."""
    checkpoint = {k: v for k, v in with_motion().state_dict().items() if ".motion_modules." in k}
    assert checkpoint and any("pos_encoder" in k for k in checkpoint)
    converted = convert_animatediff_checkpoint_to_diffusers(checkpoint)
    mine = {animatediff_to_diffusers_key(k): v for k, v in checkpoint.items() if "pos_encoder" not in k}
    assert mine.keys() == converted.keys()
    assert all(mine[k] is converted[k] for k in mine)
    # and the result is exactly the adapter's key set, positional tables aside
    ours = MotionModule(CHANNELS_MM[1], MOTION_HEADS, MAX_LEN, GROUPS_MM)
    adapter_keys = MotionAdapter(block_out_channels=CHANNELS_MM, motion_layers_per_block=1,
                                 motion_norm_num_groups=GROUPS_MM).state_dict().keys()
    expected = {k for k in adapter_keys if k.startswith(MM_PREFIX) and not k.endswith("pos_embed.pe")}
    assert {animatediff_to_diffusers_key(MM_PREFIX + k) for k in ours.state_dict()} - {None} == expected


@pytest.mark.parametrize("frames", [1, 5])
def test_motion_module_matches_animatediff_transformer3d(adapter, frames):
    theirs, ours = one_motion_module(adapter)
    x = torch.randn(2 * frames, CHANNELS_MM[1], 3, 4, generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), per_frame_motion_norms(theirs):
        expected = theirs(x, num_frames=frames)
        got = ours(x, frames=frames)
    assert max_diff(expected, x) > 1e-2  # not an identity (proj_out randomised)
    d = assert_close(got, expected, f"motion module, F={frames}")
    print(f"MotionModule vs AnimateDiffTransformer3D, F={frames}: max abs diff {d:.2e}")


def test_motion_module_prefix_frames_are_prepended(adapter):
    """Hallo's motion frames (``prefix``): diffusers' module over the M + F frames, the first M dropped."""
    theirs, ours = one_motion_module(adapter)
    g = torch.Generator().manual_seed(13)
    b, m, f, c = 2, 2, 4, CHANNELS_MM[1]
    x = torch.randn(b * f, c, 3, 3, generator=g)
    prefix = torch.randn(b * m, c, 3, 3, generator=g)
    both = torch.cat([prefix.reshape(b, m, c, 3, 3), x.reshape(b, f, c, 3, 3)], dim=1).reshape(-1, c, 3, 3)
    with torch.no_grad(), per_frame_motion_norms(theirs):
        expected = theirs(both, num_frames=m + f).reshape(b, m + f, c, 3, 3)[:, m:].reshape(-1, c, 3, 3)
        got = ours(x, frames=f, prefix=prefix)
    d = assert_close(got, expected, "motion module with prefix frames")
    print(f"MotionModule with {m} prefix frames vs AnimateDiffTransformer3D: max abs diff {d:.2e}")


def test_positional_tables_match_diffusers(adapter):
    theirs = adapter.get_submodule(MM_PREFIX + "transformer_blocks.0.pos_embed").pe
    ours = MotionModule(CHANNELS_MM[1], MOTION_HEADS, MAX_LEN, GROUPS_MM).temporal_transformer
    for attn in ours.transformer_blocks[0].attention_blocks:
        assert attn.pos_encoder.pe.shape == theirs.shape == (1, MAX_LEN, CHANNELS_MM[1])
        assert max_diff(attn.pos_encoder.pe, theirs) < 1e-6
    for dim in (320, 640, 1280):  # the SD-1.5 widths, AnimateDiff's 32 positions
        assert max_diff(PositionalEncoding.table(dim, 32), SinusoidalPositionalEmbedding(dim, 32).pe) < 1e-6


def test_diffusers_motion_norm_spans_frames(adapter):
    """The documented difference: diffusers normalises over all frames of a clip, AnimateDiff / Hallo (and
    ours) each frame alone. The same for one frame; for several, only with diffusers' norms per frame."""
    theirs, ours = one_motion_module(adapter)
    f = 4
    x = torch.randn(2 * f, CHANNELS_MM[1], 3, 3, generator=torch.Generator().manual_seed(14))
    x = x * torch.linspace(0.5, 2.0, f).repeat(2).reshape(-1, 1, 1, 1)  # frames of different scales
    with torch.no_grad():
        assert max_diff(ours(x, frames=f), theirs(x, num_frames=f)) > 1e-2
        assert max_diff(ours(x[:2], frames=1), theirs(x[:2], num_frames=1)) < ATOL


# ---------------------------------------------------------------------------------------------------------
# a whole UNetMotionModel


def test_denoising_unet_matches_unet_motion_model(adapter):
    """``UNetMotionModel.from_unet2d(unet, adapter)`` vs ``DenoisingUNet3D`` with motion modules (no audio
    modules, SFM or reference): a motion module after the attention of every layer, and between the middle
    block's attention and its second resnet. The motion modules of the plain blocks (the last down block, the
    first up block) are zeroed in both: Hallo's inference skips them (``tests/data/hallo_golden/README.md``),
    diffusers runs them, so the comparison stays neutral on that point."""
    unet = tiny_unet2d(seed=20, channels=CHANNELS_MM, groups=GROUPS_MM, heads=HEADS_MM)
    motion = UNetMotionModel.from_unet2d(unet, adapter).eval()
    n = len(CHANNELS_MM)
    zeroed = (f"down_blocks.{n - 1}.motion_modules.", "up_blocks.0.motion_modules.")
    with torch.no_grad():
        for prefix in zeroed:
            for module in motion.get_submodule(prefix.rstrip(".")):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
    den = with_motion()
    load_from_diffusers(den, motion.state_dict(), may_be_absent=zeroed)  # should ours not build those
    plain = with_motion(use_motion_modules=False)
    plain.load_state_dict({k: v for k, v in den.state_dict().items() if ".motion_modules." not in k})

    b, f = 2, 4
    g = torch.Generator().manual_seed(21)
    sample = torch.randn(b, 4, f, 8, 8, generator=g)
    timesteps = torch.tensor([250, 999])
    faces = torch.randn(b, N_FACE, CROSS_DIM, generator=g)
    with torch.no_grad(), per_frame_motion_norms(motion) as switched:
        expected = motion(sample, timesteps, encoder_hidden_states=faces.repeat_interleave(f, dim=0)).sample
        got = den(sample, timesteps, face_tokens=faces)
        without = plain(sample, timesteps, face_tokens=faces)
    assert switched == n + 1 + 2 * n  # down blocks (1 layer), middle block, up blocks (2 layers)
    assert max_diff(without, expected) > 1e-3  # the motion modules matter
    d = assert_close(got, expected, "UNetMotionModel prediction")
    print(f"denoising UNet (F={f}) vs UNetMotionModel: max abs diff {d:.2e}")
