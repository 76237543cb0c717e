"""LCKD network: `from models import LCKD, LCKDConfig`."""
from models.lckd import ACTIVATIONS, LCKD, MODEL_SIZES, NORMS, LCKDConfig

__all__ = ["ACTIVATIONS", "LCKD", "LCKDConfig", "MODEL_SIZES", "NORMS"]
