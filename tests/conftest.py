"""Fixtures shared by the tests of eval.py, predict.py and the figures, a guard of torch's
process-wide settings for every test, and one thread for the modules of tiny tensors."""
import pytest
import torch

from datasets.synthetic import generate
from models import LCKD, LCKDConfig

# Small enough for the CPU (the 15-subset pass decodes 15 times), large enough for the
# published normalisation (its histogram needs 50 voxels per top bin).
SHAPE_XYZ = (64, 64, 32)  # network order (32, 64, 64): one window of the saved input_size


@pytest.fixture(autouse=True)
def torch_settings():
    """Restore what a test's in-process main() may set for the whole process (bench_train's
    --threads, train.py's deterministic algorithms). A later test that compares its own
    predictions with a subprocess's needs the same thread count in both: the count changes the
    summation order, and so a voxel's label near 0.5."""
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): one
    thread is about as fast alone, and much faster when other processes share the cores (torch's
    thread pool waits at every op's barrier, ~10x slower under contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def segmentation_setup(tmp_path_factory):
    """Two synthetic cases in root/data, a list of them (cases.csv, one.csv), and a random
    small model saved as train.py does (root/final.pth). -> (root, case folders)"""
    root = tmp_path_factory.mktemp("segmentation")
    cases = generate(root / "data", 2, shape_xyz=SHAPE_XYZ, seed=3)
    (root / "cases.csv").write_text("".join(f"{c.name}\n" for c in cases))
    (root / "one.csv").write_text(f"{cases[1].name}\n")
    torch.manual_seed(0)
    model = LCKD(LCKDConfig.small())
    checkpoint = {"model": model.state_dict(),
                  "config": {"model_size": "small", "input_size": [32, 64, 64],
                             "weight_std": True, "norm_cfg": "IN",
                             "activation_cfg": "LeakyReLU"}}
    torch.save(checkpoint, root / "final.pth")
    return root, cases
