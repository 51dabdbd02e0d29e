"""SINGER: audio-driven singing video generation."""
__version__ = "0.1.0"
