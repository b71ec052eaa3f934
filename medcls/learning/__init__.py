"""Making and measuring models: data sets and their cleaning, augmentation, training,
evaluation, localisation metrics, site adaptation and segmentation training."""
