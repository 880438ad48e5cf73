"""Shared fixtures: a tiny random U-Net, and single-threaded torch for the tiny-model tests."""

import pytest
import torch

from pipeline.models import build_unet


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet():
    """A randomly initialised 16×16 class-conditional U-Net (10 classes + the null class), deterministic."""
    torch.manual_seed(0)
    return build_unet(resolution=16, num_classes=10, block_out_channels=[16, 32], layers_per_block=1,
                      attention=False).eval()
