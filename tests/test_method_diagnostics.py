"""benchmarks/method_diagnostics.py: the stroke chromaticity its amplifier diagnostic compares, on known images."""

import numpy as np

from benchmarks.method_diagnostics import stroke_chromaticity


def test_stroke_chromaticity_is_the_stroke_colour_over_its_brightness():
    img = np.zeros((2, 8, 8, 3), np.uint8)
    img[0, 2:6, 3] = (200, 100, 50)  # a stroke, brightness 200
    img[1, 2:6, 3] = (100, 50, 25)  # the same colour at half the intensity
    img[1, 0, 0] = (10, 40, 10)  # a faint pixel below 0.6 × the brightest: not stroke
    np.testing.assert_allclose(stroke_chromaticity(img), [[1.0, 0.5, 0.25], [1.0, 0.5, 0.25]], atol=1e-9)


def test_stroke_chromaticity_spread_tracks_colour_noise():
    rng = np.random.default_rng(0)
    base = np.array([200.0, 100.0, 50.0])
    def images(noise):
        out = np.zeros((200, 8, 8, 3), np.uint8)
        out[:, 2:6, 3] = np.clip(base + rng.normal(0, noise, (200, 1, 3)), 0, 255).round().astype(np.uint8)
        return out
    assert stroke_chromaticity(images(12.0)).std(0).sum() > 3 * stroke_chromaticity(images(2.0)).std(0).sum()
