"""spd_optax: Selective Projection Decay and Fast Trainable Projection for optax."""

from spd_optax._l2sp import adamw_l2sp
from spd_optax._l2sp import l2_sp
from spd_optax._l2sp import L2SPState
from spd_optax._spd import adam_spd
from spd_optax._spd import selective_projection_decay
from spd_optax._spd import SelectiveProjectionDecayState

__version__ = '0.1.0'

__all__ = (
    'adam_spd',
    'adamw_l2sp',
    'l2_sp',
    'L2SPState',
    'selective_projection_decay',
    'SelectiveProjectionDecayState',
)
