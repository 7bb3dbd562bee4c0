"""Data parallelism over MPI ranks: the world and its collectives (``world``), how gradients are exchanged
(``exchange``: ``train.comm``), and overlapping the exchange with the backward pass (``overlap``, ``nonblocking``)."""
