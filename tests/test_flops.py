"""FLOP accounting (vlm/flops.py): counts equal the hand-written multiply-add counts, the CPU's fused attention
included, and the device peaks are looked up by name."""

import torch

from vlm.flops import count_flops, peak_flops, utilisation


def test_matrix_products_and_attention_are_counted_as_two_flops_per_multiply_add():
    linear = torch.nn.Linear(64, 128)
    _, flops = count_flops(lambda: linear(torch.randn(10, 64)))
    assert flops == 2 * 10 * 64 * 128
    q, k, v = torch.randn(2, 4, 100, 32), torch.randn(2, 4, 80, 32), torch.randn(2, 4, 80, 32)
    out, flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert out.shape == (2, 4, 100, 32)
    assert flops == 2 * (2 * 4 * 100 * 80 * 32) * 2        # q k^T and weights v, 2 FLOPs per multiply-add each


def test_a_decoder_forward_counts_its_weights_and_attention(twin):
    """One LM forward over L positions: 2 x (decoder weights used per token) x L, plus the attention products
    (4 x heads x head_dim x L x L per layer), plus the head at the one projected position."""
    lm = twin.adapter.language_model(twin.model)
    config = lm.config
    length = 40
    embeds = torch.randn(1, length, config.hidden_size)
    _, flops = count_flops(lambda: lm(inputs_embeds=embeds, use_cache=False))
    matrices = sum(p.numel() for name, p in twin.decoder_layers.named_parameters()
                   if p.dim() == 2)                                      # projections, not norms or biases
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_attention_heads * head_dim * length * length * config.num_hidden_layers
    assert flops == 2 * matrices * length + attention


def test_peaks_are_known_for_gpus_only():
    assert peak_flops("cpu") is None
    assert utilisation(1e12, 1.0, None) is None
    assert utilisation(5e14, 1.0, 1e15) == 0.5
