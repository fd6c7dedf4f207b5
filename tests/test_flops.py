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


def test_counted_work_is_every_layer_call_and_every_image(twin):
    """count_work: one plain forward of a batch is batch x length positions through every decoder layer and batch
    images through the vision tower; a replayed last position adds one position per layer it runs."""
    from PIL import Image

    from vlm.interventions import count_work
    from vlm.replay import last_position_row, record, replayed_runs

    white = Image.new("RGB", (twin.grid.width, twin.grid.height), "white")
    inputs = twin.encode([white, white], ["The color of the square above the red square is"] * 2)
    with count_work(twin) as work:
        twin.last_logits(inputs)
    batch, length = inputs["input_ids"].shape
    assert (work.token_layers, work.images) == (batch * length * twin.n_layers, batch)
    one = twin.encode([white], ["The color of the square above the red square is"])
    records = record(twin, [one], [twin.visual_tokens(one)], batch_size=1)
    with count_work(twin) as work:
        replayed_runs(twin, [last_position_row(records[0], [])], keep_cache=False)
    assert (work.token_layers, work.images) == (twin.n_layers, 0)
