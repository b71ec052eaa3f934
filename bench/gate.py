"""The input gate: how often it flags scans that are not what a model was trained on
(detection), and how often it flags the model's own test split (false alarms).

Out-of-domain sets: the other task's test split (chest radiographs for brain models and the
reverse), MedMNIST breast ultrasound test images, and the photographs and micrographs that
scikit-image ships.

    python -m bench.gate [--data ../shared/data]
"""

from __future__ import annotations

import numpy as np

from bench.common import command, machine, parser, table, write

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
          "immunohistochemistry", "retina", "brick", "grass", "gravel", "moon", "page", "text",
          "horse", "clock", "coins", "colorwheel")
OTHER_TASK = {"brain-mri": "chest-xray", "chest-xray": "brain-mri"}


def photo_scans():
    import skimage.data

    from medcls.io.load import scan_from_array

    out = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[..., :3]
        out.append(scan_from_array(img))
    return out


def flagged(predictor, arrays) -> float:
    return float(np.mean([p.outside_training_distribution for p in predictor.predict_arrays(arrays)]))


def main(argv=None):
    from medcls.engine.inference import Predictor
    from medcls.io.preprocess import stack
    from medcls.learning.data import load_dataset, preprocess_records
    from medcls.models.package import list_packages

    args = parser(__doc__).parse_args(argv)
    step = 10 if args.quick else 1
    result = {"command": command(), "machine": machine(), "models": {}}
    rows = []
    photos = photo_scans()
    breast = load_dataset(args.data / "medmnist" / "breastmnist.npz")
    for folder, card in list_packages(args.models):
        p = Predictor.from_path(folder)
        own = load_dataset(args.data / card["task"], classes=p.classes)
        other = load_dataset(args.data / OTHER_TASK[card["task"]])
        x_own, _ = preprocess_records(own, own.split("test")[::step], p.spec)
        x_other, _ = preprocess_records(other, other.split("test")[::step], p.spec)
        x_breast, _ = preprocess_records(breast, breast.split("test")[::step], p.spec)
        x_photo = stack([p.preprocess(s) for s in photos])
        entry = {"threshold": p.package.gate.threshold,
                 "false_alarm_own_test": flagged(p, x_own), "n_own_test": len(x_own),
                 f"detected_{OTHER_TASK[card['task']]}": flagged(p, x_other), "n_other_task": len(x_other),
                 "detected_breast_ultrasound": flagged(p, x_breast), "n_breast": len(x_breast),
                 "detected_photographs": flagged(p, x_photo), "n_photographs": len(x_photo)}
        result["models"][card["name"]] = entry
        rows.append([card["name"], entry["false_alarm_own_test"], OTHER_TASK[card["task"]],
                     entry[f"detected_{OTHER_TASK[card['task']]}"], entry["detected_breast_ultrasound"],
                     entry["detected_photographs"]])
        print(card["name"], entry, flush=True)
    md = ["# Input gate: outside what the model was trained on", "",
          "Mahalanobis distance of the penultimate embedding to the nearest training class mean, "
          "threshold at the 99th percentile of the validation split's distances.", "",
          table(["model", "false alarms (own test split)", "other task", "detected (other task test)",
                 "detected (breast ultrasound)", "detected (18 photos/micrographs)"], rows), "",
          f"Command: `{result['command']}`"]
    write("gate", result, "\n".join(md), args.out)


if __name__ == "__main__":
    main()
