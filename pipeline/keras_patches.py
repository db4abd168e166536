"""Every place the pipeline changes Keras's behaviour, in one room, each with its reason.

Both patches make Keras 3 train under TensorFlow's ``MultiWorkerMirroredStrategy``
(keras-team/keras #20585) and touch nothing else. Each names the Keras attribute it relies on and the
version it was written against (:data:`PATCHED`); ``tests/pipeline/test_keras_patches.py`` fails, naming
the patch, when one of those attributes is gone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Patch:
    name: str
    module: str
    attribute: str  # dotted inside the module
    written_for: str  # "package version"


SCALARS = "multi-worker scalars averaged with an all-reduce (average_multi_worker_scalars)"
BUILD = "training state built before fit (build_for_fit)"
TRAINER = "keras.src.backend.tensorflow.trainer"
PATCHED = (
    Patch(SCALARS, TRAINER, "reduce_per_replica", "keras 3.15"),
    Patch(SCALARS, TRAINER, "_collective_all_reduce_multi_worker", "keras 3.15"),
    Patch(SCALARS, TRAINER, "_is_per_replica_instance", "keras 3.15"),
    Patch(BUILD, "keras.src.trainers.trainer", "Trainer._symbolic_build", "keras 3.15"),
    Patch(BUILD, TRAINER, "TensorFlowTrainer._maybe_symbolic_build", "keras 3.15"),
)


def average_multi_worker_scalars() -> None:
    """Keras 3.x averages a multi-worker step's per-replica results with ``reduce(MEAN, axis=0)``, which
    fails on the scalar loss and metrics (keras-team/keras #20585); scalars get the plain all-reduce
    mean, everything else is left to Keras. Process-wide, idempotent: only multi-worker steps change."""
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.reduce_per_replica, "multi_worker_scalars", False):
        return
    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(strategy):
            return original(values, strategy, reduction)

        def mean(value):
            if not trainer._is_per_replica_instance(value):
                return value
            rank = strategy.experimental_local_results(value)[0].shape.rank
            return strategy.reduce("MEAN", value, axis=0 if rank else None)

        return tree.map_structure(mean, values)

    reduce_per_replica.multi_worker_scalars = True
    trainer.reduce_per_replica = reduce_per_replica


def build_for_fit(model, sample_batch) -> None:
    """Build the model's loss, metric and optimizer state under its strategy from one local batch.

    Keras 3.x builds that state inside ``fit`` by averaging the first *distributed* batch across
    workers with a call the multi-worker strategy rejects (keras-team/keras #20585): built here from
    shapes alone, ``fit`` has nothing left to build. This one model only.
    """
    strategy = model.distribute_strategy
    with strategy.scope():
        model._symbolic_build(data_batch=sample_batch)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
