"""SINGER model components (DESIGN.md section 3).

Submodules are imported explicitly (e.g. ``from singer.models.msm import MultiScaleSpectralModule``) so that
importing this package stays cheap.
"""
