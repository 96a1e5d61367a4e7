"""pytest fixtures shared by the test modules; the helpers they use live in `tests/utils.py`."""

import pytest

from utils import tiny_model, tiny_processor


@pytest.fixture(scope="module")
def model():
    """A tiny random MQIRTN model in eval mode, shared by the tests of a module (they only read it)."""
    return tiny_model().eval()


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """A tiny processor, shared by the tests of a module (they only read it)."""
    return tiny_processor(tmp_path_factory.mktemp("processor"))
