"""The model: the M-CNN (``mcnn``), its layers (``layers``: how a convolution is computed, ``impl``), max-pool
(``pool``), the XLA convolutions (``xla_conv``), the native CPU kernels (``native``) and FLOP counts (``flops``)."""
