import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

logging.disable_progress_bar()
torch.set_num_threads(2)


@pytest.fixture
def tiny():
    from alignkit.models import tiny_model_and_tokenizer

    return tiny_model_and_tokenizer(seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models generate fastest on one thread, and far less sensitive to other work on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
