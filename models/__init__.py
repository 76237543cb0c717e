"""LCKD network: `from models import LCKD, LCKDConfig`."""
from models.lckd import LCKD, LCKDConfig

__all__ = ["LCKD", "LCKDConfig"]
