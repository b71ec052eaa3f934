"""What a model is: its card (the contract it carries), the network registry, calibration and
the input gate, saliency (Grad-CAM family), the package on disk, and the segmentation
companion's inference half."""
