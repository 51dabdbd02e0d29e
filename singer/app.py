"""`singer app`: the web page. A photo and a song in, the video of that person singing it out.

    singer app [--params params.yaml] [--host 127.0.0.1] [--port 7860] [--model models/full]

A Gradio page over the same code as `singer generate` (`singer.generate.generate_video`, with params.yaml's
`compute`, `generate` and `crop` settings): a photo upload, a song upload or microphone recording, steps /
guidance / seed, and the model: a local `save_pretrained` folder or a registered one (`models:/singer@champion`,
`models:/singer@challenger`; any other path or URI can be typed in). The progress bar counts denoising steps
over all windows; the result plays in the page and downloads as an mp4. A bad upload (no face, not audio, too
long, a model that is not there) shows the CLI's one-line message, never a traceback.

Generation runs one request at a time (dlib is not thread-safe, and 2 cores gain nothing from two at once);
each request writes into its own temporary folder. Nothing reaches the internet: no share link, no analytics.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

REGISTRY_CHOICES = ("models:/singer@champion", "models:/singer@challenger")


def model_choices(default: str) -> list[str]:
    """The model box's suggestions: the given model first, then the local folder and the registry aliases."""
    return list(dict.fromkeys([default, "models/full", *REGISTRY_CHOICES]))


def build_app(params: Path = Path("params.yaml"), model: str | None = None):
    """The page, as a `gr.Blocks` (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from singer.config import load_config
    from singer.generate import GenerateError, generate_video

    cfg = load_config(params)
    default_model = model or "models/full"
    lock = threading.Lock()

    def generate(photo, song, model_name, steps, guidance, seed, progress=gr.Progress()):  # noqa: B008
        if not photo:
            raise gr.Error("upload a photo with one face first")
        if not song:
            raise gr.Error("upload or record a song first")
        out = Path(tempfile.mkdtemp(prefix="singer-app-")) / "singer.mp4"

        def step(done: int, total: int) -> None:
            progress(done / total, desc=f"denoising step {done} of {total}")

        try:
            with lock:
                generate_video(Path(photo), Path(song), out, str(model_name or default_model),
                               steps=int(steps) if steps else None, guidance=float(guidance),
                               seed=int(seed or 0), progress=False, warn=lambda message: gr.Warning(message),
                               compute=cfg.compute, settings=cfg.generate, crop=cfg.crop, callback=step)
        except GenerateError as exc:
            raise gr.Error(str(exc)) from None
        return str(out)

    with gr.Blocks(title="SINGER") as page:
        gr.Markdown("# SINGER\nA photo and a song in; the person in the photo sings the song.")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="photo (one face)", type="filepath", elem_id="photo")
                song = gr.Audio(label="song", sources=["upload", "microphone"], type="filepath", elem_id="song")
                with gr.Accordion("settings", open=True):
                    model_box = gr.Dropdown(model_choices(default_model), value=default_model,
                                            allow_custom_value=True, label="model (folder or models:/name@alias)",
                                            elem_id="model")
                    steps = gr.Number(value=cfg.model.inference_steps, precision=0, minimum=1, label="steps",
                                      elem_id="steps")
                    guidance = gr.Number(value=cfg.model.guidance_scale, minimum=0, label="guidance",
                                         elem_id="guidance")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="the video", elem_id="result", autoplay=False)
        button.click(generate, [photo, song, model_box, steps, guidance, seed], video, concurrency_limit=1)
    return page


def serve(params: Path = Path("params.yaml"), host: str = "127.0.0.1", port: int = 7860,
          model: str | None = None) -> None:
    """Build the page and serve it until interrupted."""
    page = build_app(params, model)
    page.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=False,
                                                    show_error=True, quiet=True)
