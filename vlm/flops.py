"""FLOPs a computation executes, and how far a device is from its physical limit.

`count_flops(fn)` runs `fn()` under torch's FlopCounterMode: the multiply-adds of every matrix product and
attention call that actually ran (2 FLOPs each), whatever took the route (full forwards, the patching engine's
replayed rows, the vision tower). torch counts the GPU attention kernels; the CPU's fused attention kernel
(`_scaled_dot_product_flash_attention_for_cpu`) is registered here with the same formula, so a count on the CPU
equals one on the GPU. Counting is slow (a dispatch mode): count once, time apart.

`peak_flops(device)`: the device's dense bf16 tensor-core peak, from NVIDIA's datasheets (no sparsity), None for
a CPU or an unknown GPU; `fraction_of_peak = FLOPs / seconds / peak` is then the model-FLOPs utilisation.
"""

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

# dense bf16 TFLOP/s (NVIDIA datasheets; SXM parts unless named), matched against torch.cuda.get_device_name in order
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0),
                    ("A10", 125.0), ("L4", 121.0), ("RTX 4090", 165.0), ("A6000", 155.0))


@functools.cache
def _register_cpu_attention() -> None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return

    @register_flop_formula([op])
    def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn) -> tuple[object, int]:
    """(fn(), the FLOPs its matrix products and attention calls executed)."""
    _register_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def layer_flops_per_token(vlm) -> float:
    """FLOPs of one position through one decoder layer, its matrix products only (2 per weight of the layer's
    projections; attention's own products, about 1% at these lengths and widths, are left out)."""
    weights = sum(p.numel() for p in vlm.decoder_layers.parameters() if p.dim() == 2)
    return 2.0 * weights / vlm.n_layers


@torch.no_grad()
def vision_flops_per_image(vlm) -> int:
    """FLOPs of one image through the vision tower and projector (counted on a blank image of the model's size)."""
    from PIL import Image

    inputs = vlm.encode([Image.new("RGB", (vlm.grid.width, vlm.grid.height), "white")], [""])
    return count_flops(lambda: vlm.visual_tokens(inputs))[1]


def work_flops(work, per_token_layer: float, per_image: float) -> float:
    """Model FLOPs of counted work (vlm.interventions.count_work)."""
    return work.token_layers * per_token_layer + work.images * per_image


def peak_flops(device) -> float | None:
    """The dense bf16 peak of `device` in FLOP/s; None for a CPU or a GPU not in PEAK_BF16_TFLOPS."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def utilisation(flops: float | None, seconds: float, peak: float | None) -> float | None:
    """FLOP/s over the peak (None when either is unknown)."""
    if flops is None or peak is None or seconds <= 0:
        return None
    return flops / seconds / peak
