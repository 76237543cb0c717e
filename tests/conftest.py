"""Fixtures shared by the tests of eval.py, predict.py and the figures."""
import pytest
import torch

from datasets.synthetic import generate
from models import LCKD, LCKDConfig

# Small enough for the CPU (the 15-subset pass decodes 15 times), large enough for the
# published normalisation (its histogram needs 50 voxels per top bin).
SHAPE_XYZ = (64, 64, 32)  # network order (32, 64, 64): one window of the saved input_size


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
