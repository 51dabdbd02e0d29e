"""Prefect flows of the SINGER pipeline (DESIGN section 4).

    flows.pipeline   flow `singer-pipeline`: one task per DVC stage (`dvc repro <stage>`), artifacts
    flows.retrain    flow `singer-retrain`: new videos from S3 -> data/raw -> pipeline -> register -> release
    flows.common     running commands, transient-fault classification, params.yaml overrides
    flows/prefect.yaml   the deployments (process pool `singer-process`, Kubernetes pool `singer-k8s`)

Run one locally (a temporary Prefect server is started when PREFECT_API_URL is unset):

    python -m flows.pipeline --stages split train --set train.steps=20
    python -m flows.retrain s3://singer/incoming
"""
