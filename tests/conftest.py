"""Shared fixtures: tiny models and images keep the suite fast on a 2-core CPU."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: A narrow filter list: the full topology (12 blocks, 36 separable convs) at a fraction of the cost.
TINY_FILTERS = (8, 8, 16, 16, 24, 24, 32)


@pytest.fixture
def tiny_filters():
    return TINY_FILTERS
