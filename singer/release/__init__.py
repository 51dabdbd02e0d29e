"""From a run to a release: what each stage execution records in MLflow, and how a model becomes `champion`.

    tracking.py   MLflow runs (one per stage execution, main process only), per-step metrics, checkpoints,
                  videos, figures, tables: `start_run`, `log_step`, `log_checkpoint`, ...
    lineage.py    what a run records about its origin: the scrubbed config as params, git, data hash
    registry.py   the pyfunc model (`SingerPyfunc`), registration (`challenger`), the release gate and the
                  promotion to `champion` (`singer register`, `singer release`)

Import the modules themselves (`from singer.release import tracking`, `from singer.release.registry import
release`): this file imports nothing, so tracking a run never pays for importing `mlflow.pyfunc`.
"""
