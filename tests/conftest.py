import os

# Tests never touch the network, and tiny models run fastest (and steadiest on a busy 2-core
# machine) on one thread.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "images")


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
    path = os.path.join(SHARED_IMAGES, "boy.jpg")
    if not os.path.exists(path):
        pytest.skip("shared/images/boy.jpg not present")
    return path
