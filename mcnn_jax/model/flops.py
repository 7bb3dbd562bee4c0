"""FLOPs of the M-CNN per image, counted layer by layer (a multiply-add is 2 FLOPs; pooling and ReLU are free).

The count is the model's, whatever the form: exact streaming (``model.stream_tile``) computes each tile's halo
again on top of it, which ``mcnn_jax.model.stream.halo_overhead`` gives.

Training FLOPs = forward + backward, where the backward pass computes every weight gradient (as many FLOPs
as the forward layer) and every input gradient except that of each branch's first convolution (whose input
is the image, which nothing differentiates).
"""

from __future__ import annotations

from mcnn_jax.model.mcnn import MCNN, check_architecture, check_input_size


def layer_flops(model: MCNN, height: int = 1024, width: int = 1280, channels: int = 3) -> list[dict]:
    """One row per layer: name, forward FLOPs, and whether its input gradient is computed."""
    total = check_architecture(model.pool_factors, model.widths, model.post_pools)
    check_input_size(height, width, total, model.merge_pool)
    k2 = model.kernel_size**2
    rows = []
    for b, (f, w) in enumerate(zip(model.pool_factors, model.widths)):
        pixels = (height // f) * (width // f)
        cin = channels
        for j in range(model.convs_per_branch):
            rows.append(dict(name=f"branch{b}/conv{j}", forward=2 * k2 * cin * w * pixels, input_grad=j > 0))
            cin = w
    pixels = (height // total) * (width // total)
    rows.append(dict(name="merge", forward=2 * sum(model.widths) * model.merge_width * pixels, input_grad=True))
    flat = (height // total // model.merge_pool) * (width // total // model.merge_pool) * model.merge_width
    if model.head != "flatten":  # global pooling of the merged map: one value per channel
        flat = model.merge_width
    rows.append(dict(name="hidden", forward=2 * flat * model.head_width, input_grad=True))
    rows.append(dict(name="logits", forward=2 * model.head_width * model.num_classes, input_grad=True))
    return rows


def mcnn_flops(model: MCNN | None = None, height: int = 1024, width: int = 1280, channels: int = 3) -> dict:
    """Forward, backward and training FLOPs per image (about 51.4 GFLOP forward for the published model)."""
    rows = layer_flops(model or MCNN(), height, width, channels)
    forward = sum(r["forward"] for r in rows)
    backward = sum(r["forward"] * (2 if r["input_grad"] else 1) for r in rows)
    return dict(forward=forward, backward=backward, train=forward + backward)
