"""Batch renormalisation of a random start (`norms.renormalize_a_random_start`)."""

from __future__ import annotations

import torch
from torch import nn

from gandlf_dimlift.models.norms import BatchRenorm3d, renormalize_a_random_start, renormalize_batch_norms


def test_a_random_starts_first_training_batch_sets_the_running_statistics():
    """A random start's running statistics (0 and 1) are replaced by its first training batch's, which that batch
    is normalised with (from 8 values per channel on); later batches update them at the momentum. Renormalised
    norms without the flag (slice attention's, whatever its weights) keep the statistics they have."""
    encoder = nn.Sequential(nn.Conv3d(1, 4, 1), nn.BatchNorm3d(4))
    renormalize_a_random_start(encoder, "test")
    assert type(encoder[1]) is BatchRenorm3d and encoder[1].momentum == 0.1
    x = torch.randn(2, 4, 3, 3, 3) * 5 + 2
    var, mean = torch.var_mean(x, dim=(0, 2, 3, 4), unbiased=True)
    with torch.no_grad():
        first = encoder[1](x)
    assert torch.allclose(encoder[1].running_mean, mean) and torch.allclose(encoder[1].running_var, var)
    expected = (x - mean.view(-1, 1, 1, 1)) / (var.view(-1, 1, 1, 1) + encoder[1].eps).sqrt()
    assert torch.allclose(first, expected, atol=1e-5)
    with torch.no_grad():
        encoder[1](x + 10)
    assert torch.allclose(encoder[1].running_mean, mean + 1.0, atol=1e-5)  # a tenth of the way to mean + 10

    few = nn.Sequential(nn.BatchNorm3d(4))
    renormalize_a_random_start(few, "test")
    with torch.no_grad():  # 2 values per channel: too few to start from; the statistics move at the momentum
        few(torch.full((2, 4, 1, 1, 1), 10.0))
    assert torch.allclose(few[0].running_mean, torch.full((4,), 1.0))

    plain = nn.Sequential(nn.BatchNorm3d(4))
    renormalize_batch_norms(plain)
    with torch.no_grad():
        assert torch.allclose(plain(x), x / (1 + plain[0].eps) ** 0.5, atol=1e-5)  # at the statistics 0 and 1


def test_an_encoder_its_model_renormalised_itself_gets_the_random_start_too():
    """Slice attention renormalises its encoder whatever the weights; from random weights the builder then starts
    those norms from the first batch's statistics, at the architecture's momentum."""
    encoder = nn.Sequential(nn.Conv3d(1, 4, 1), nn.BatchNorm3d(4))
    renormalize_batch_norms(encoder)
    renormalize_a_random_start(encoder, "test", momentum=0.03)
    assert encoder[1].start_from_first_batch and encoder[1].momentum == 0.03
    x = torch.randn(2, 4, 3, 3, 3) * 5 + 2
    var, mean = torch.var_mean(x, dim=(0, 2, 3, 4), unbiased=True)
    with torch.no_grad():
        encoder[1](x)
        encoder[1](x + 10)
    assert torch.allclose(encoder[1].running_mean, mean + 0.3, atol=1e-5)  # 3 % of the way to mean + 10
    assert torch.allclose(encoder[1].running_var, var, rtol=1e-4)
