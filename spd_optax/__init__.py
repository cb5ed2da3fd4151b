"""spd_optax: Selective Projection Decay and Fast Trainable Projection for optax."""

from spd_optax._ftp import adam_ftp
from spd_optax._ftp import fast_trainable_projection
from spd_optax._ftp import FastTrainableProjectionState
from spd_optax._ftp import sgd_ftp
from spd_optax._l2sp import adamw_l2sp
from spd_optax._l2sp import l2_sp
from spd_optax._l2sp import L2SPState
from spd_optax._sharding import restore_state
from spd_optax._sharding import state_sharding
from spd_optax._spd import adam_spd
from spd_optax._spd import selective_projection_decay
from spd_optax._spd import SelectiveProjectionDecayState

__version__ = '0.1.0'

__all__ = (
    'adam_ftp',
    'adam_spd',
    'adamw_l2sp',
    'fast_trainable_projection',
    'FastTrainableProjectionState',
    'l2_sp',
    'L2SPState',
    'restore_state',
    'selective_projection_decay',
    'SelectiveProjectionDecayState',
    'sgd_ftp',
    'state_sharding',
)
