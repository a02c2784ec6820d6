"""PyTorch reference trainer: an MLP on the digits data, on the GPU the trial was given.

Same contract as ``trainer.reference`` (``train(hparams, data, ctx) -> F1``), plus what a
GPU trainer needs:

- runs on ``ctx.device``: ``cuda`` (the first GPU in the trial's ``CUDA_VISIBLE_DEVICES``)
  or ``cpu``; a trial given GPUs on a host where torch sees none fails loudly instead of
  quietly training on the CPU while holding GPU quota;
- mixed precision on CUDA (``torch.autocast`` in bf16 where supported, else fp16 with a
  ``GradScaler``); full fp32 on the CPU;
- seeded and deterministic: initial weights from ``seed``, the shuffle order and dropout
  masks of epoch k from (seed, k), so an interrupted and resumed trial ends with the same
  weights as an uninterrupted one;
- an atomic checkpoint (model, optimizer, scaler, epoch) after every epoch, resumed from
  ``ctx.resume_from``;
- per-epoch ``val_f1``, ``train_loss`` and ``epoch_s`` (training time of the epoch) via
  ``ctx.report``, plus ``gpu_max_memory_mb`` on CUDA (proof the tensors lived on the GPU);
- an MLflow pytorch model (CPU weights) in ``ctx.model_dir``, so the registered champion
  loads anywhere with ``mlflow.pytorch.load_model``.

torch (and what its first optimizer and MLflow's first save_model import lazily) is imported
at module level on purpose: the sweep's fork server preloads the entry point's module once,
so trials fork with it all imported instead of paying 3-10 s each (importing torch does not
initialise CUDA, so forking afterwards is safe).

Settings (``ctx.settings``): ``epochs`` (10), ``seed`` (0), ``average`` ("macro"), ``amp``
(true: mixed precision on CUDA), ``threads`` (1: CPU threads per trial; several trials
share the host's cores), ``epoch_sleep_s`` (0: a pause after each checkpoint, for tests).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc  # noqa: F401  # loaded lazily by the first save_model: 0.3 s per trial otherwise
import mlflow.pytorch  # noqa: F401  # what ctx.save_model imports: once per sweep, not per trial
import numpy as np
import torch
import torch._dynamo  # noqa: F401  # imported by the first optimizer's __init__: 2-7 s per trial otherwise
from sklearn.metrics import f1_score
from torch import nn

from trainer.common import EpochSettings, known_hparams
from trainer.contract import DataRefs, TrainContext
from trainer.prepare import N_FEATURES, load_xy

CHECKPOINT_NAME = "checkpoint.pt"
N_CLASSES = 10
HPARAM_DEFAULTS: dict[str, Any] = {"hidden": 64, "layers": 1, "lr": 1e-3, "weight_decay": 0.0,
                                   "batch_size": 64, "dropout": 0.0}


def train(hparams: dict[str, Any], data: DataRefs, ctx: TrainContext) -> float:
    hp = known_hparams(hparams, HPARAM_DEFAULTS, ctx.logger)
    settings = EpochSettings.read(ctx.settings)
    epochs, seed, average, sleep_s = settings.epochs, settings.seed, settings.average, settings.sleep_s

    device = _device(ctx)
    amp_dtype = _amp_dtype(device, bool(ctx.settings.get("amp", True)))
    if device.type == "cpu":
        torch.set_num_threads(int(ctx.settings.get("threads", 1)))
    ctx.logger.info("training on %s, mixed precision: %s, torch %s", _describe(device),
                    amp_dtype or "off", torch.__version__)

    X_tr, y_tr = (torch.tensor(a, device=device) for a in load_xy(Path(data.train)))
    X_val, y_val = load_xy(Path(data.val))
    X_val_t = torch.tensor(X_val, device=device)

    torch.manual_seed(seed)  # initial weights; on a resume they are overwritten by the checkpoint
    model = build_model(int(hp["hidden"]), int(hp["layers"]), float(hp["dropout"])).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))
    # Loss scaling only matters for fp16 (bf16 has fp32's range); disabled it is a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = _resume(ctx, device, model, optimizer, scaler)

    batch_size = int(hp["batch_size"])
    loss_fn = nn.CrossEntropyLoss()
    f1: float | None = None
    y_pred = None
    for epoch in range(start, epochs + 1):
        # Keyed on (seed, epoch): epoch k shuffles and drops out the same way whether or not
        # the run was interrupted before it.
        torch.manual_seed(seed * 100_003 + epoch)
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(y_tr))).to(device)
        began = time.perf_counter()
        model.train()
        total, seen = torch.zeros((), device=device), 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(X_tr[idx]), y_tr[idx])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach() * len(idx)  # summed on the device: no sync per batch
            seen += len(idx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the epoch is over when the GPU is done, not when Python is
        epoch_s = time.perf_counter() - began
        y_pred = _predict(model, X_val_t, amp_dtype)
        f1 = float(f1_score(y_val, y_pred, average=average))
        metrics = {"val_f1": f1, "train_loss": float(total) / seen, "epoch_s": epoch_s}
        if device.type == "cuda":
            metrics["gpu_max_memory_mb"] = torch.cuda.max_memory_allocated(device) / 1e6
        ctx.report(epoch, **metrics)
        _save_checkpoint(Path(ctx.checkpoint_dir), epoch, model, optimizer, scaler)
        if sleep_s > 0:
            time.sleep(sleep_s)

    if f1 is None:  # resumed from a checkpoint of the final epoch: nothing left to train
        y_pred = _predict(model, X_val_t, amp_dtype)
        f1 = float(f1_score(y_val, y_pred, average=average))
    # The F1 above is from these very predictions: hpsweep bootstraps them for the F1's interval.
    ctx.log_predictions(y_val, y_pred)
    ctx.save_model(model)  # CPU weights: the champion loads on machines without a GPU
    return f1


def build_model(hidden: int, layers: int, dropout: float) -> nn.Sequential:
    """Only torch's own modules, so the saved model unpickles without this file."""
    if hidden < 1 or layers < 1 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"need hidden >= 1, layers >= 1, 0 <= dropout < 1; got {hidden}, {layers}, {dropout}")
    parts: list[nn.Module] = []
    width = N_FEATURES
    for _ in range(layers):
        parts += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    parts.append(nn.Linear(width, N_CLASSES))
    return nn.Sequential(*parts)


def _device(ctx: TrainContext) -> torch.device:
    if ctx.device != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"this trial was given GPU(s) {list(ctx.gpu_ids)} but torch {torch.__version__} "
                           "sees no CUDA device (CPU-only build, or no driver)")
    # Deterministic kernels; cuBLAS needs this set before CUDA is initialised.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    return torch.device("cuda", 0)  # CUDA_VISIBLE_DEVICES holds this trial's GPUs only


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if device.type != "cuda" or not enabled:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return f"cpu ({torch.get_num_threads()} thread(s))"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return f"cuda:0 = {torch.cuda.get_device_name(device)} (CUDA_VISIBLE_DEVICES={visible})"


@torch.no_grad()
def _predict(model: nn.Module, X_val: torch.Tensor, amp_dtype: torch.dtype | None) -> np.ndarray:
    model.eval()
    with torch.autocast(X_val.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(X_val).argmax(dim=1).cpu().numpy()


def _resume(ctx: TrainContext, device: torch.device, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler) -> int:
    """Load the newest checkpoint into model, optimizer and scaler; the epoch to continue at."""
    path = ctx.resume_from
    if path is None:
        return 1
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    ctx.logger.info("resumed from epoch %d (%s)", state["epoch"], path)
    return int(state["epoch"]) + 1


def _save_checkpoint(checkpoint_dir: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # Dot-prefixed temp name: latest_checkpoint() skips it if we die mid-write.
    tmp = checkpoint_dir / f".{CHECKPOINT_NAME}.tmp"
    torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict()}, tmp)
    os.replace(tmp, checkpoint_dir / CHECKPOINT_NAME)
