"""Prefect flows of the SINGER pipeline (DESIGN section 4).

    flows.pipeline   flow `singer-pipeline`: one task per DVC stage (`dvc repro <stage>`), artifacts
    flows.retrain    flow `singer-retrain`: new videos from S3 -> data/raw -> pipeline -> register -> release
    flows.common     the stages, targets, repository folder (the deployments' pull step), DVC's concurrency slot
    flows.commands   running a stage's command (environment, streamed output, process group)
    flows.faults     transient faults (retry) told from real failures (fail at once)
    flows.overrides  parameter overrides written into params.yaml, like `dvc exp run -S`
    flows/prefect.yaml   the deployments (process pool `singer-process`, Kubernetes pool `singer-k8s`)

Run one locally (a temporary Prefect server is started when PREFECT_API_URL is unset):

    python -m flows.pipeline --stages split train --set train.steps=20
    python -m flows.retrain s3://singer/incoming
"""
