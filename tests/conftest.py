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


ARITHMETIC = {"task": "arithmetic", "task_options": {"max_operand": 9}, "task_size": 1000, "eval_size": 200,
              "eval_split": "ood"}


@pytest.fixture(scope="session")
def arithmetic_sft(tmp_path_factory):
    """A tiny model after one SFT epoch on single-digit sums: 0.195 held-out greedy accuracy (out of
    distribution). Copy it before training."""
    from alignkit.config import build
    from alignkit.models.tiny import tiny_model, tiny_tokenizer
    from alignkit.train.recipes import RunConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = tiny_model(), tiny_tokenizer()
    cfg = build(RunConfig, {"data": {**ARITHMETIC, "task_size": 2000, "eval_size": 50},
                            "train": {"epochs": 1, "lr": 3e-3, "batch_size": 32, "progress": False},
                            "output_dir": str(tmp_path_factory.mktemp("sft"))})
    model = train(cfg, "sft", model=model, tokenizer=tokenizer).model
    torch.set_num_threads(threads)
    return model, tokenizer
