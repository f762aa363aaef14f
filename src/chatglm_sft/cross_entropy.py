"""Cross-entropy for training, computed in the logits' own memory.

`F.cross_entropy` keeps the log-softmax ([N, V]) for its backward, and its backward allocates two more [N, V]
tensors (the zero-filled gradient of the picked entries, then the gradient of the logits). With a 65k-151k vocabulary
these are most of a step's activation memory (GLM-4, 4 x 1024 answer tokens: 2.5 GB each in float32) and, on a CPU,
about a third of a tiny model's step goes into passes over them. The gradient of each token's loss is softmax -
one-hot, known as soon as the loss is, so here it is computed in the forward pass over the logits themselves, which
nothing reads afterwards (Liger Kernel's cross-entropy does the same), and the backward only scales it.
"""

from __future__ import annotations

import torch


class _CrossEntropyInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Overwritten through an alias, not marked dirty: autograd refuses that for views, which logits often are,
        # and the alias shares the version counter, so a backward that saved these logits fails loudly instead.
        logits = logits.detach()
        rows = torch.arange(len(target), device=target.device)
        picked = logits[rows, target]
        peak = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(peak).exp_()
        total = probs.sum(dim=1, keepdim=True)
        if ctx.needs_input_grad[0]:
            grad = probs.div_(total)
            grad[rows, target] -= 1
            ctx.save_for_backward(grad)
        return (peak + total.log()).squeeze(1) - picked

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses: torch.Tensor):
        if getattr(ctx, "scaled", False):  # a second backward (retain_graph=True) would scale it twice
            raise RuntimeError("cross_entropy_in_place: its backward can run only once")
        ctx.scaled = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_losses.unsqueeze(1)), None


def cross_entropy_in_place(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row of `logits` [N, V] (float32 or float64), -log softmax(logits)[target]: `F.cross_entropy(logits,
    target, reduction="none")`, to rounding. `logits` is overwritten, so pass logits that nothing else reads; the
    backward may run once (it scales the stored gradient in place)."""
    if logits.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cross_entropy_in_place takes float32 or float64 logits, not {logits.dtype}")
    return _CrossEntropyInPlace.apply(logits, target)
