import os

# Tests never touch the network, and tiny models run fastest (and steadiest on a busy 2-core
# machine) on one thread.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

#: Photos the tests use, committed with them (tests/data/README.md: source and licence).
DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    from fireflow.testing import save_tiny

    return save_tiny("flux", tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_editor(tiny_flux_dir):
    from fireflow import FireFlowEditor

    return FireFlowEditor.from_pretrained(tiny_flux_dir, device="cpu", torch_dtype="fp32")


@pytest.fixture(scope="session")
def boy_jpg():
    return os.path.join(DATA, "boy.jpg")


@pytest.fixture(scope="session")
def horse_jpg():
    return os.path.join(DATA, "horse.jpg")
