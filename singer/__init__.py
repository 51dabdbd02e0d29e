"""SINGER: audio-driven singing video generation.

Model classes are importable from the top level (`singer.DenoisingUNet3D`), lazily: diffusers' pipeline
loader looks classes up as `getattr(importlib.import_module("singer"), name)`, and importing `singer`
must stay cheap (no torch import until a model class is asked for).
"""

__version__ = "0.1.0"

_LAZY = {
    "DenoisingUNet3D": "singer.models.unet_denoising",
    "ReferenceUNet2D": "singer.models.unet_reference",
    "FaceLocator": "singer.models.face_locator",
    "AudioEncoder": "singer.models.audio",
    "FaceEncoder": "singer.models.face",
    "PixelShuffleAutoencoder": "singer.models.autoencoder",
    "MultiScaleSpectralModule": "singer.models.msm",
    "SelfAdaptiveFilterModule": "singer.models.sfm",
    "SingerPipeline": "singer.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'singer' has no attribute {name!r}")
