"""Face identity tokens: the trainable projection of the reference face's identity embedding to cross-attention
tokens.

    embedder = make_face_embedder(cfg.model)              # singer.faces: DlibFaceEmbedder / InsightFaceEmbedder
    emb = embedder.embed(reference_rgb)                   # (D,) float32, computed once per clip, outside the graph
    tokens = FaceEncoder.from_model_config(cfg.model)(torch.from_numpy(emb)[None])   # (1, face_tokens, D_x)

The embedders (detection, alignment, dlib's ResNet or an ArcFace ONNX model) live in ``singer.faces.identity``:
the network knows tensors, not images or detectors.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["FaceEncoder"]


class FaceEncoder(ModelMixin, ConfigMixin):
    """Hallo's ``ImageProjModel``: identity embedding (B, D) -> (B, tokens, cross_attention_dim).

    ``proj`` Linear(embed_dim, tokens * cross_attention_dim), then ``norm`` LayerNorm(cross_attention_dim).
    Paper shapes: proj.weight [3072, 512], norm [768] (``hallo_net.pth.imageproj.json``).
    """

    @register_to_config
    def __init__(self, embed_dim: int = 128, tokens: int = 4, cross_attention_dim: int = 64):
        super().__init__()
        self.proj = nn.Linear(embed_dim, tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    @classmethod
    def from_model_config(cls, model_cfg: Any) -> FaceEncoder:
        return cls(
            embed_dim=model_cfg.face_embed_dim,
            tokens=model_cfg.face_tokens,
            cross_attention_dim=model_cfg.cross_attention_dim,
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.ndim != 2 or embedding.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"face embedding must be (B, {self.config.embed_dim}), got shape {tuple(embedding.shape)}"
            )
        x = self.proj(embedding.to(self.proj.weight.dtype))
        x = x.reshape(-1, self.config.tokens, self.config.cross_attention_dim)
        return self.norm(x)
