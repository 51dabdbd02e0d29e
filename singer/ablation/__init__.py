"""`singer ablate`: train and evaluate the spectral-module variants with one budget, then the paper's Table 3.

    singer ablate                                  # every variant x seed of params.ablate, then the report
    singer ablate --variant no_msm --seed 0        # one run (what each DVC `ablate-run@...` stage does)
    singer ablate --report-only                    # the table from the runs already on disk (DVC `ablate`)
    dvc repro ablate                               # the same through DVC, one stage per variant x seed

    plan.py     which runs (variant x seed), their folders, the ablation key, their MLflow parent/child runs
    runs.py     one run trained and evaluated the normal way (`run_one`), all of them (`run_all`)
    report.py   metrics/ablation.json and reports/ablation.{md,csv,png} from the runs on disk
"""

from singer.ablation.plan import (
    RUN_FILE,
    AblationError,
    AblationRun,
    ablation_key,
    planned_runs,
    run_dir,
    run_is_current,
    run_overrides,
)
from singer.ablation.report import aggregate, markdown_table, write_report
from singer.ablation.runs import run_all, run_one, run_single

__all__ = [
    "RUN_FILE",
    "AblationError",
    "AblationRun",
    "ablation_key",
    "aggregate",
    "markdown_table",
    "planned_runs",
    "run_all",
    "run_dir",
    "run_is_current",
    "run_one",
    "run_overrides",
    "run_single",
    "write_report",
]
