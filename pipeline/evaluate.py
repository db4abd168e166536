"""Scoring: test-set metrics of a trained model, the accuracy of a registered version, and the
plots people review in the MLflow UI."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, log_loss, precision_recall_fscore_support

from contract import IMAGE_SHAPE, NUM_CLASSES
from pipeline.export import predict_savedmodel
from pipeline.model import first_conv_layer, model_input
from pipeline.register import download_saved_model

LABELS = list(range(NUM_CLASSES))


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    probabilities: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray

    def metrics(self) -> dict[str, float]:
        """Test loss/accuracy and per-class precision, recall and F1, named for MLflow."""
        precision, recall, f1, _ = precision_recall_fscore_support(self.labels, self.predictions, labels=LABELS, zero_division=0)
        metrics = {"test_accuracy": self.accuracy, "test_loss": self.loss}
        for digit in LABELS:
            metrics[f"test_precision_{digit}"] = float(precision[digit])
            metrics[f"test_recall_{digit}"] = float(recall[digit])
            metrics[f"test_f1_{digit}"] = float(f1[digit])
        return metrics

    def report(self) -> str:
        return classification_report(self.labels, self.predictions, labels=LABELS, digits=4, zero_division=0)


def score(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> Evaluation:
    """The trained model's answers on raw images, scored: how the job scores the test split and a
    search scores each trial on the validation split."""
    probabilities = keras.ops.convert_to_numpy(model.predict(model_input(images), batch_size=1024, verbose=0))
    return evaluate_probabilities(probabilities, labels)


def evaluate_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> Evaluation:
    predictions = probabilities.argmax(axis=1)
    return Evaluation(
        accuracy=float((predictions == labels).mean()),
        loss=float(log_loss(labels, np.clip(probabilities, 1e-7, 1.0), labels=LABELS)),
        probabilities=probabilities,
        predictions=predictions,
        labels=labels,
    )


def registered_accuracy(model_uri: str, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of a registered version (``models:/name@alias`` or ``models:/name/3``) through its SavedModel:
    what ``python -m pipeline evaluate`` reports, and how the gate re-scores the champion."""
    with tempfile.TemporaryDirectory(prefix="mnist-eval-") as tmp:
        probabilities = predict_savedmodel(download_saved_model(model_uri, Path(tmp)), images)
    return float((probabilities.argmax(1) == labels).mean())


def figures(
    model: keras.Model, history: dict[str, list[float]], evaluation: Evaluation, images: np.ndarray
) -> dict[str, plt.Figure]:
    """Every plot of a training run by file name; the caller logs and closes them."""
    return {
        "accuracy_curve.png": plot_curve(history, "accuracy"),
        "loss_curve.png": plot_curve(history, "loss"),
        "confusion_matrix.png": plot_confusion_matrix(evaluation),
        "misclassified.png": plot_misclassified(images, evaluation),
        "feature_maps.png": plot_feature_maps(model, images[0]),
    }


def plot_curve(history: dict[str, list[float]], metric: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, len(history[metric]) + 1)
    ax.plot(epochs, history[metric], marker="o", label=f"train {metric}")
    if f"val_{metric}" in history:
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label=f"validation {metric}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric.capitalize()} per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_confusion_matrix(evaluation: Evaluation) -> plt.Figure:
    matrix = confusion_matrix(evaluation.labels, evaluation.predictions, labels=LABELS)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(LABELS)
    ax.set_yticks(LABELS)
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(f"Confusion matrix (test accuracy {evaluation.accuracy:.4f})")
    threshold = matrix.max() / 2
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=7, color="white" if count > threshold else "black")
    fig.tight_layout()
    return fig


def plot_misclassified(images: np.ndarray, evaluation: Evaluation, limit: int = 36) -> plt.Figure:
    """Up to ``limit`` misclassified test digits, each captioned "true t / pred p". Drawn as one image
    (a montage) with one caption per cell: 36 subplots and a tight layout took 2 s of each training."""
    wrong = np.flatnonzero(evaluation.predictions != evaluation.labels)[:limit]
    cols, caption, gap = 6, 12, 4
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    cell_h, cell_w = IMAGE_SHAPE[0] + caption, IMAGE_SHAPE[1] + gap
    montage = np.zeros((rows * cell_h, cols * cell_w), dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(cols * 1.6, rows * 1.8))
    for n, index in enumerate(wrong):
        top, left = (n // cols) * cell_h + caption, (n % cols) * cell_w + gap // 2
        montage[top : top + IMAGE_SHAPE[0], left : left + IMAGE_SHAPE[1]] = images[index]
        label = f"true {evaluation.labels[index]} / pred {evaluation.predictions[index]}"
        ax.text(left + IMAGE_SHAPE[1] / 2, top - 2, label, ha="center", va="bottom", fontsize=8)
    ax.imshow(montage, cmap="gray_r", interpolation="nearest")
    ax.axis("off")
    fig.suptitle(f"Misclassified test digits ({int((evaluation.predictions != evaluation.labels).sum())} in all)")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92)
    return fig


def plot_feature_maps(model: keras.Model, image: np.ndarray) -> plt.Figure:
    conv = first_conv_layer(model)
    extractor = keras.Model(model.input, conv.output)
    maps = keras.ops.convert_to_numpy(extractor(model_input(image[None]), training=False))[0]
    channels = maps.shape[-1]
    cols = min(8, channels)
    rows = int(np.ceil(channels / cols))
    fig, axes = plt.subplots(rows, cols + 1, figsize=((cols + 1) * 1.5, rows * 1.6))
    axes = np.atleast_2d(axes)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(image, cmap="gray_r")
    axes[0, 0].set_title("input", fontsize=8)
    for channel in range(channels):
        ax = axes[channel // cols, 1 + channel % cols]
        ax.imshow(maps[..., channel], cmap="viridis")
        ax.set_title(f"{conv.name}[{channel}]", fontsize=7)
    fig.suptitle(f"Feature maps of the first conv layer ({conv.name})")
    fig.tight_layout()
    return fig
