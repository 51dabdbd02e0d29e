"""A toy training script for the checkpoint, crash/resume and `accelerate launch` tests.

    python tests/toy_train.py --out OUT [--steps 10] [--checkpoint-every 5] [--keep-last 2] [--dropout 0.2] [--constant-lr] [--mlflow]
    accelerate launch --config_file infra/accelerate/multi_cpu.yaml tests/toy_train.py --out OUT --mlflow

A small MLP with dropout (so the RNG state matters; `--dropout 0` makes a step a pure function of the batch, so
N ranks match one process that takes the whole global batch, given `--constant-lr` too), Adam (so the optimizer state matters) and a linear
lr decay (so the scheduler matters; accelerate steps a prepared scheduler once per process per step, so N
ranks decay N times faster than one process), trained on deterministic batches chosen by step number (each rank
takes its share of the global batch). Checkpoints go to OUT/checkpoints through singer.train.checkpoint;
it resumes from the newest one. At the end each rank writes OUT/rank-<i>.json (rank, world size,
distributed type, start step, weights hash) and OUT/weights-rank<i>.pt.

Faults, from the environment:
    TOY_CRASH_AT=7          die in step 7, after the optimizer step (TOY_CRASH_MODE=exit: os._exit(1), the
                            default; raise: an exception)
    TOY_CRASH_IN_SAVE=10    die while saving the step-10 checkpoint, after its files and marker are written
                            into .tmp-step-000010 but before the rename
With --mlflow (rank 0 only): the run named by MLFLOW_RUN_ID (or a new one) in MLFLOW_TRACKING_URI, the
artifact root TOY_ARTIFACTS; logs loss and lr per step and every checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from singer.train import checkpoint as ckpt  # noqa: E402

GLOBAL_BATCH = 8
N_ROWS = 64


class Crash(RuntimeError):
    pass


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_ROWS, 4, generator=g)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]))
    return x, y


def make_model(dropout: float = 0.2) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1)
    )


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _crash(step: int) -> None:
    if os.environ.get("TOY_CRASH_MODE", "exit") == "raise":
        raise Crash(f"simulated crash at step {step}")
    sys.stdout.flush()
    os._exit(1)


def train(
    out: str | os.PathLike,
    steps: int = 10,
    checkpoint_every: int = 5,
    keep_last: int = 2,
    seed: int = 0,
    lr: float = 0.05,
    crash_at: int | None = None,
    use_mlflow: bool = False,
    dropout: float = 0.2,
    constant_lr: bool = False,
) -> dict:
    """Train (resuming from OUT/checkpoints when possible); returns {'state_dict', 'start_step', ...}."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from singer.train import check_world_size, want_cpu

    out = Path(out)
    accelerator = Accelerator(cpu=want_cpu())
    check_world_size(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(seed, device_specific=True)  # seed + rank: dropout masks differ per rank, as they should

    model = make_model(dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda s: 1.0) if constant_lr else (lambda s: max(0.1, 1.0 - s / (2.0 * steps))))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    x, y = make_data()

    ckpt_dir = out / "checkpoints"
    state = ckpt.resume(accelerator, ckpt_dir)
    start = int(state["step"]) if state else 0

    cfg = None
    if use_mlflow:
        from singer.config import Config, TrackingConfig

        cfg = Config(
            tracking=TrackingConfig(
                artifact_location=os.environ.get("TOY_ARTIFACTS", str(out / "mlartifacts")), experiment="toy"
            )
        )
    import contextlib

    from singer.release import tracking

    run_ctx = tracking.start_run(cfg, stage="toy") if cfg is not None else contextlib.nullcontext()
    with run_ctx as run:
        run_id = run.info.run_id if run is not None else None
        model.train()
        for step in range(start + 1, steps + 1):
            rows = torch.arange((step - 1) * GLOBAL_BATCH, step * GLOBAL_BATCH) % N_ROWS
            mine = rows[rank::world]
            pred = model(x[mine])
            loss = torch.nn.functional.mse_loss(pred, y[mine])
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if crash_at is not None and step == crash_at:
                _crash(step)
            if cfg is not None:
                tracking.log_step({"loss": loss.detach(), "lr": scheduler.get_last_lr()[0]}, step)
            if step % checkpoint_every == 0 or step == steps:
                path = ckpt.save_checkpoint(
                    accelerator,
                    ckpt_dir,
                    step,
                    extra={"samples_seen": step * GLOBAL_BATCH, "mlflow_run_id": run_id},
                    keep_last=keep_last,
                )
                if cfg is not None:
                    tracking.log_checkpoint(path, step)
        accelerator.wait_for_everyone()
        final = accelerator.unwrap_model(model)
        digest = weights_hash(final)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {k: v.detach().cpu().clone() for k, v in final.state_dict().items()},
            out / f"weights-rank{rank}.pt",
        )
        info = {
            "rank": rank,
            "world": world,
            "distributed_type": str(accelerator.distributed_type),
            "start_step": start,
            "resumed_from": state.get("checkpoint") if state else None,
            "weights_sha256": digest,
            "mlflow_run_id": run_id,
            "pid": os.getpid(),
        }
        (out / f"rank-{rank}.json").write_text(json.dumps(info, indent=2))
    return {"state_dict": {k: v.detach().cpu().clone() for k, v in final.state_dict().items()}, **info}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--constant-lr", action="store_true")
    parser.add_argument("--mlflow", action="store_true")
    args = parser.parse_args(argv)
    crash_at = int(os.environ["TOY_CRASH_AT"]) if os.environ.get("TOY_CRASH_AT") else None
    if os.environ.get("TOY_CRASH_IN_SAVE"):
        doomed = int(os.environ["TOY_CRASH_IN_SAVE"])
        original = ckpt._write_marker

        def write_then_die(folder, step, num_processes):
            original(folder, step, num_processes)
            if step == doomed:
                _crash(step)

        ckpt._write_marker = write_then_die
    train(
        args.out,
        args.steps,
        args.checkpoint_every,
        args.keep_last,
        args.seed,
        crash_at=crash_at,
        use_mlflow=args.mlflow,
        dropout=args.dropout,
        constant_lr=args.constant_lr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
