"""Test configuration: Triton runs in its interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, hence here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import triton_available  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if triton_available():
        return
    skip = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(skip)
