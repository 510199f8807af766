"""Shared by the reference scripts (run in the reference venv): non-trivial BatchNorm for random-weight parity."""
import torch


def randomise_batchnorm(model: torch.nn.Module, batch: torch.Tensor) -> torch.nn.Module:
    """Running statistics from one training-mode pass over ``batch`` (cumulative average), then perturbed, and
    random gamma/beta, so a wrong BatchNorm mapping cannot hide behind mean 0 / var 1. Returns the model in eval."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(batch)
        gen = torch.Generator().manual_seed(1)
        for bn in bns:
            c = bn.num_features
            bn.running_var.mul_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            bn.running_mean.add_(0.2 * torch.randn(c, generator=gen) * bn.running_var.sqrt())
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()
