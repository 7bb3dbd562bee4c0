"""mcnn-jax: the multi-scale CNN (M-CNN) on full-resolution microscopy images, on CPU clusters.

from mcnn_jax import MCNN, mcnn_flops
"""

from mcnn_jax.model.flops import mcnn_flops
from mcnn_jax.model.mcnn import MCNN, count_params, from_config, init_params

__version__ = "0.1.0"
__all__ = ["MCNN", "count_params", "from_config", "init_params", "mcnn_flops", "__version__"]
