"""Training on Ray Train: :func:`train_on_ray` runs :func:`medcls.learning.train.train` in every
worker of a ``TensorflowTrainer`` (which sets ``TF_CONFIG``) under a
``MultiWorkerMirroredStrategy``: the same ``tf.data`` pipeline, auto-sharded so each worker reads
its share of every batch. Worker 0's output, a normal model package, is reported as the Ray
checkpoint and copied to ``--out``: checkpoint and package are the same format as local
training.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from medcls.core.errors import ClusterError
from medcls.integrations.ray.cluster import connect
from medcls.models.package import CARD_FILE

log = logging.getLogger(__name__)


def _keras_multiworker_fix() -> None:
    """Two Keras 3.15 bugs under MultiWorkerMirroredStrategy, fixed in Ray Train workers only:

    - ``fit`` averages the first distributed batch across replicas only to learn its shapes
      (``_maybe_symbolic_build``), and that eager reduce fails ("Attempt to convert a value
      (PerReplica...) to a Tensor"): the local replica's batch has the same shapes, build from it;
    - the per-step logs (scalar loss and metrics) are averaged with ``axis=0``, which a scalar
      does not have ("Invalid reduction dimension 0"): average them across replicas, no axis.
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    original = TensorFlowTrainer._maybe_symbolic_build
    if getattr(original, "_medcls_fix", False):
        return
    reduce_original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(
                lambda v: (strategy.reduce("MEAN", v, axis=None)
                           if isinstance(v, tf.distribute.DistributedValues) else v), values)
        return reduce_original(values, strategy, reduction)

    def build(self, iterator=None, data_batch=None):
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda v: (self.distribute_strategy.experimental_local_results(v)[0]
                               if isinstance(v, tf.distribute.DistributedValues) else v), next(it))
                break
        return original(self, iterator=None, data_batch=data_batch)

    build._medcls_fix = True
    TensorFlowTrainer._maybe_symbolic_build = build
    tf_trainer.reduce_per_replica = reduce_per_replica


def _train_worker(config: dict) -> None:
    """Ray Train worker: :func:`medcls.learning.train.train` under MultiWorkerMirroredStrategy. Worker 0
    writes the package and reports it as the checkpoint; the others write a scratch copy."""
    import ray.train
    import tensorflow as tf

    from medcls.learning.train import TrainConfig, train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    _keras_multiworker_fix()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    cfg = TrainConfig(**config["cfg"])
    scratch = Path(tempfile.mkdtemp(prefix=f"medcls-train-{rank}-"))
    cfg.out = str(scratch / "package")
    if cfg.cache_dir:  # one cache per worker: two writers never race on one file
        cfg.cache_dir = str(Path(cfg.cache_dir) / f"ray-worker-{rank}")
    out = train(cfg, command=config["command"], strategy=strategy)
    checkpoint = ray.train.Checkpoint.from_directory(str(out)) if rank == 0 else None
    card = json.loads((Path(out) / CARD_FILE).read_text())
    ray.train.report({"test_accuracy": card["metrics"]["test"]["accuracy"],
                      "epochs_run": card["training"]["epochs_run"]}, checkpoint=checkpoint)
    shutil.rmtree(scratch, ignore_errors=True)


def train_on_ray(cfg, workers: int, address: str | None = None, command: str | None = None,
                 storage: str | Path | None = None) -> Path:
    """Train ``cfg`` with ``workers`` Ray Train workers (one CPU each); the package lands in
    ``cfg.out`` as with local training. ``storage`` holds Ray's run records and checkpoints
    (default: a ``.ray-train`` folder beside ``cfg.out``; on a multi-machine cluster it must be
    storage every node can write, e.g. NFS or S3)."""
    from dataclasses import asdict

    connect(address)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    out = Path(cfg.out).resolve()

    def absolute(path):  # workers do not run in this folder: paths are resolved here
        return str(Path(path).resolve()) if path else path

    paths = {"data": [absolute(d) for d in cfg.folders], "cache_dir": absolute(cfg.cache_dir),
             "init": absolute(cfg.init), "weights": absolute(cfg.weights)}
    storage = Path(storage) if storage else out.parent / ".ray-train"
    storage.mkdir(parents=True, exist_ok=True)
    config = {"cfg": asdict(cfg) | paths, "command": command or ""}
    trainer = TensorflowTrainer(
        _train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(storage.resolve())))
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error
        raise ClusterError(f"Training on the Ray cluster failed: {exc}") from exc
    if result.checkpoint is None:
        raise ClusterError("Training on the Ray cluster finished without a model package.")
    if out.exists():
        shutil.rmtree(out)
    result.checkpoint.to_directory(str(out))
    log.info("model package from Ray Train worker 0 -> %s (metrics %s)", out, result.metrics)
    return out
