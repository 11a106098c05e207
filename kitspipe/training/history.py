"""The per-epoch training log (CSV) and its picture (progress.png)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from kitspipe.atomic import atomic_write_bytes, atomic_write_text

COLUMNS = ["phase", "epoch", "learning_rate", "loss_total", "loss_high", "loss_low", "loss_classification",
           "skipped_steps", "val_kidney_dice", "val_tumour_dice", "val_low_dice", "val_score",
           "seconds_data", "seconds_compute", "seconds_validation"]


def write_log(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def plot_progress(path: Path, rows: list[dict]) -> None:
    """Losses and validation Dice per epoch, both phases on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(1, len(rows) + 1))
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss_total", "total"), ("loss_high", "high-res"), ("loss_low", "low-res"),
                       ("loss_classification", "classification")):
        # A term a phase does not train is logged as 0; on a log axis it is left out instead.
        values = [float(v) if v not in (None, "") and float(v) > 0 else float("nan") for v in
                  (r.get(key) for r in rows)]
        if any(v == v for v in values):
            loss_ax.plot(x, values, label=label)
    loss_ax.set_xlabel("epoch (all phases)")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    if loss_ax.lines:
        loss_ax.legend()
    for key, label in (("val_kidney_dice", "kidney"), ("val_tumour_dice", "tumour"), ("val_low_dice", "low-res")):
        # Epochs without validation (training.validation_interval) are left out, not drawn as gaps.
        points = [(i, float(r[key])) for i, r in zip(x, rows) if r.get(key) not in (None, "")]
        if points:
            dice_ax.plot(*zip(*points), marker="o", ms=3, label=label)
    phase_changes = [i + 1 for i in range(1, len(rows)) if rows[i]["phase"] != rows[i - 1]["phase"]]
    for ax in (loss_ax, dice_ax):
        for change in phase_changes:
            ax.axvline(change - 0.5, color="grey", ls="--", lw=0.8)
    dice_ax.set_ylim(0, 1)
    dice_ax.set_xlabel("epoch (all phases)")
    dice_ax.set_ylabel("validation Dice (whole cases)")
    if dice_ax.lines:
        dice_ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
