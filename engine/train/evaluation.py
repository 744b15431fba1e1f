"""Classification metrics (top-1, per class, per group, worst group, confusion matrix) and the curves PNG.

Pure numpy and matplotlib (Agg): the training loop calls `classification_metrics` on gathered predictions,
the driver calls `plot_curves` on the epoch history.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def classification_metrics(
    labels: np.ndarray, predictions: np.ndarray, groups: np.ndarray, class_names: list[str]
) -> dict:
    """Top-1, accuracy per class and per group, worst-group accuracy and the confusion matrix.

    `groups` holds the `group` column (-1 = unknown). Worst-group accuracy is the minimum over the groups
    present with at least one row (None when no row has a group), the metric of the group-robustness
    literature (Sagawa et al. 2020, Waterbirds). `confusion_matrix[true][predicted]` counts rows.
    """
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(predictions, np.int64)
    groups = np.asarray(groups, np.int64)
    if not len(labels) == len(predictions) == len(groups):
        raise ValueError(
            f"lengths differ: {len(labels)} labels, {len(predictions)} predictions, {len(groups)} groups"
        )
    num_classes = len(class_names)
    correct = labels == predictions
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    per_class = {
        name: float(correct[labels == c].mean()) if (labels == c).any() else None
        for c, name in enumerate(class_names)
    }
    group_accuracy = {
        str(g): float(correct[groups == g].mean()) for g in np.unique(groups[groups >= 0]).tolist()
    }
    worst = min(group_accuracy.items(), key=lambda item: (item[1], int(item[0]))) if group_accuracy else None
    return {
        "num_rows": int(len(labels)),
        "top1": float(correct.mean()) if len(labels) else None,
        "per_class": per_class,
        "group_accuracy": group_accuracy,
        "worst_group": worst[1] if worst else None,
        "worst_group_id": int(worst[0]) if worst else None,
        "confusion_matrix": confusion.tolist(),
    }


def plot_curves(history: list[dict], path: Path, title: str = "") -> Path:
    """Loss and accuracies per epoch (train, val top-1, val worst group) into a PNG; phase 2 is shaded."""
    plt = pyplot()

    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], marker="o", label="train top-1")
    for key, label in (("val_top1", "val top-1"), ("val_worst_group", "val worst group")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax_acc.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=label)
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    phase2 = [e for e, h in zip(epochs, history, strict=True) if h.get("phase") == 2]
    for ax in (ax_loss, ax_acc):
        if phase2:
            ax.axvspan(
                min(phase2) - 0.5, max(phase2) + 0.5, color="grey", alpha=0.15, label="phase 2 (real only)"
            )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def plot_variants(
    summary: list[dict], metrics: tuple[tuple[str, str], ...], path: Path, title: str = ""
) -> Path:
    """One panel per metric: a bar per variant at its mean over seeds with the std as error bar (jobs.sweep's
    `summarize` entries, values in [0, 1] shown in %); a variant without a value gets no bar."""
    plt = pyplot()

    names = [entry["variant"] for entry in summary]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        means = [
            100 * e[key]["mean"] if e.get(key) and e[key]["mean"] is not None else np.nan for e in summary
        ]
        stds = [100 * e[key]["std"] if e.get(key) and e[key]["mean"] is not None else 0.0 for e in summary]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{label} (%)")
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, title)


def pyplot():
    """matplotlib's pyplot on the Agg backend: workers and CI have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str = "") -> Path:
    """The figure's title, layout and PNG (folders made as needed); the figure is closed."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path
