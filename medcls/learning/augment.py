"""Source randomisation: augmentation that makes *where a slice comes from* unreadable while
keeping its anatomy (and so its label and tumour box).

A model trained on brain-mri alone learned the source (Br35H JPEGs: every no-tumour image;
figshare: every tumour) instead of the anatomy. Sources differ in intensity curves, sharpness,
noise, resolution, JPEG history and how much border or skull the slice shows, so each of those
is randomised here, per image, with tf ops usable in ``tf.data``:

- intensity: gamma, contrast stretch (random clip points), histogram jitter (a random
  monotone piecewise-linear curve);
- blur or sharpen (Gaussian kernel, unsharp mask);
- Gaussian or Rician noise;
- down-and-up resampling (a lower acquisition or storage resolution);
- JPEG re-encoding at a random quality.

Border and skull crop jitter is geometric (it moves the tumour box), so it lives with the other
geometric steps in :func:`medcls.learning.data.augmentation`, which transform image and box mask together.

Input and output: one image ``(S, S, C)`` float32 in [0, 1], all channels equal (gray); the
output has the same shape, range and gray-ness. Every step keeps pixel positions, so labels and
boxes are untouched.
"""

from __future__ import annotations

# Probability of each step; each draws its own strength.
P_CURVE, P_BLUR, P_SHARPEN, P_NOISE, P_RESAMPLE, P_JPEG = 0.8, 0.25, 0.2, 0.35, 0.3, 0.35


def _coin(p):
    import tensorflow as tf

    return tf.random.uniform([]) < p


def _uniform(lo, hi):
    import tensorflow as tf

    return tf.random.uniform([], lo, hi)


def intensity_curve(g):
    """Gamma, then a contrast stretch, then a random monotone curve (histogram jitter)."""
    import tensorflow as tf

    g = tf.pow(tf.clip_by_value(g, 0.0, 1.0), tf.exp(_uniform(-0.5, 0.5)))  # gamma 0.61-1.65
    lo, hi = _uniform(0.0, 0.12), _uniform(0.8, 1.0)
    g = tf.clip_by_value((g - lo) / (hi - lo), 0.0, 1.0)
    # histogram jitter: piecewise-linear through 6 knots with random positive increments
    steps = tf.random.uniform([5], 0.5, 1.5)
    knots = tf.concat([[0.0], tf.cumsum(steps) / tf.reduce_sum(steps)], axis=0)  # 0..1, increasing
    pos = g * 5.0
    i = tf.clip_by_value(tf.cast(tf.floor(pos), tf.int32), 0, 4)
    frac = pos - tf.cast(i, tf.float32)
    return tf.gather(knots, i) * (1.0 - frac) + tf.gather(knots, i + 1) * frac


def _gaussian_kernel(sigma, radius: int = 3):
    import tensorflow as tf

    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * (x / sigma) ** 2)
    k = k / tf.reduce_sum(k)
    return k


def gaussian_blur(g, sigma):
    """Separable Gaussian blur of a (S, S, 1) image."""
    import tensorflow as tf

    k = _gaussian_kernel(sigma)
    x = g[None]
    x = tf.nn.conv2d(tf.pad(x, [[0, 0], [3, 3], [0, 0], [0, 0]], "SYMMETRIC"),
                     tf.reshape(k, [7, 1, 1, 1]), 1, "VALID")
    x = tf.nn.conv2d(tf.pad(x, [[0, 0], [0, 0], [3, 3], [0, 0]], "SYMMETRIC"),
                     tf.reshape(k, [1, 7, 1, 1]), 1, "VALID")
    return x[0]


def blur_or_sharpen(g):
    import tensorflow as tf

    g = tf.cond(_coin(P_BLUR), lambda: gaussian_blur(g, _uniform(0.5, 1.5)), lambda: g)
    return tf.cond(_coin(P_SHARPEN),
                   lambda: g + _uniform(0.3, 1.0) * (g - gaussian_blur(g, _uniform(0.7, 1.5))),
                   lambda: g)


def noise(g):
    """Gaussian noise, or Rician (the magnitude of complex Gaussian noise, as in MR)."""
    import tensorflow as tf

    sd = _uniform(0.005, 0.05)
    n1 = tf.random.normal(tf.shape(g), stddev=sd)
    n2 = tf.random.normal(tf.shape(g), stddev=sd)
    return tf.cond(_coin(0.5), lambda: g + n1, lambda: tf.sqrt(tf.square(g + n1) + tf.square(n2)))


def resample(g):
    """Down to 35-90% of the size and back up (bilinear): a coarser acquisition."""
    import tensorflow as tf

    size = tf.shape(g)[:2]
    f = _uniform(0.35, 0.9)
    small = tf.cast(tf.cast(size, tf.float32) * f, tf.int32)
    return tf.image.resize(tf.image.resize(g, small, method="area"), size, method="bilinear")


def jpeg(g):
    import tensorflow as tf

    q = tf.random.uniform([], 30, 96, dtype=tf.int32)
    return tf.image.adjust_jpeg_quality(tf.clip_by_value(g, 0.0, 1.0), q)


def source_randomise(img):
    """One image (S, S, C), gray in [0, 1] -> the same anatomy as if from another source."""
    import tensorflow as tf

    channels = img.shape[-1]
    g = img[..., :1]
    g = tf.cond(_coin(P_CURVE), lambda: intensity_curve(g), lambda: g)
    g = blur_or_sharpen(g)
    g = tf.cond(_coin(P_RESAMPLE), lambda: resample(g), lambda: g)
    g = tf.cond(_coin(P_NOISE), lambda: noise(g), lambda: g)
    g = tf.clip_by_value(g, 0.0, 1.0)
    g = tf.cond(_coin(P_JPEG), lambda: jpeg(g), lambda: g)
    g = tf.ensure_shape(tf.clip_by_value(g, 0.0, 1.0), img.shape[:-1] + (1,))
    return tf.repeat(g, channels, axis=-1) if channels and channels > 1 else g


DESCRIPTION = ("source randomisation per image: gamma 0.61-1.65, contrast stretch, random "
               "monotone intensity curve (p 0.8); Gaussian blur (p 0.25) / unsharp sharpen "
               "(p 0.2); down-up resampling to 35-90% (p 0.3); Gaussian or Rician noise sd "
               "0.005-0.05 (p 0.35); JPEG quality 30-95 (p 0.35)")
