"""Training: a tiny run of the real training code writes a loadable package; the box loss
rewards a class map peaking inside the box."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require

# ----------------------------------------------------------------------------- training smoke

def test_training_smoke_run_writes_a_loadable_package(tmp_path, data_dir):
    """A tiny run of the real training code: a valid package whose card matches the model."""
    from medcls.engine.inference import Predictor
    from medcls.learning.train import TrainConfig, train

    out = train(TrainConfig(data=str(require(data_dir / "brain-mri")), arch="seed-cnn",
                            out=str(tmp_path / "smoke"), epochs=1, batch_size=16, max_train=48,
                            input_size=64, cache_dir=None, patience=1), command="pytest smoke")
    p = Predictor.from_path(out)
    assert p.card["metrics"]["test"]["n"] == 24
    assert p.card["preprocessing"]["input_size"] == 64
    probs = p.predict_arrays(np.zeros((2, 64, 64, 3), np.float32))
    assert all(abs(q.probabilities.sum() - 1) < 1e-6 for q in probs)


def test_box_loss_rewards_a_class_map_peaking_inside_the_box():
    from medcls.learning.train import box_energy_loss

    targets = np.zeros((3, 4, 4, 3), np.float32)
    targets[:2, ..., 1] = -1
    targets[:2, 1:3, 1:3, 1] = 1  # images 0 and 1: class 1 with a box; image 2: no box
    maps = np.zeros((3, 4, 4, 3), np.float32)
    maps[0, 1, 1, 1] = 10.0  # true class peaks inside the box
    maps[1, 3, 3, 1] = 10.0  # ... outside
    maps[1, 1, 1, 0] = 10.0  # another class inside does not help
    maps[2, 0, 0, 2] = 10.0
    loss = np.asarray(box_energy_loss(targets, maps))
    assert loss[0] < 0.01 and loss[1] > 5 and loss[2] == 0
    flat = np.asarray(box_energy_loss(targets, np.zeros_like(maps)))
    assert flat[0] == pytest.approx(-np.log(4 / 16), rel=1e-4)  # uniform map: 4 of 16 cells inside
