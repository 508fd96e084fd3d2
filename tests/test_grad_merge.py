"""adarec/grad_merge.py: ADRec's public PCGrad merge (mean over shared parameters, sum over the
rest, optional projection of conflicting gradients) against hand computations, and the surrogate
loss whose gradient is the merged gradient."""

import pytest
import torch
from torch import nn

from adarec.grad_merge import merge_gradients, merged_gradient_loss


class TwoHeads(nn.Module):
    """shared (reached by both losses), head_a (loss A only), head_b (loss B only), idle (neither)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.head_a = nn.Parameter(torch.tensor([3.0]))
        self.head_b = nn.Parameter(torch.tensor([-1.0]))
        self.idle = nn.Parameter(torch.tensor([5.0, 6.0]))

    def losses(self):
        s = self.shared
        # d loss_a / d shared = [2, 0] * head_a = [6, 0]; d / d head_a = 2 s0 = 2
        # d loss_b / d shared = [-1, 1]            ; d / d head_b = 2 head_b = -2
        loss_a = 2.0 * s[0] * self.head_a.sum()
        loss_b = -s[0] + s[1] + self.head_b.pow(2).sum()
        return [loss_a, loss_b]


def hand_gradients():
    """Each loss's gradient over (shared, head_a, head_b, idle), flattened, as computed by hand."""
    g_a = torch.tensor([6.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    g_b = torch.tensor([-1.0, 1.0, 0.0, -2.0, 0.0, 0.0])
    return g_a, g_b


def split(flat):
    return [flat[0:2], flat[2:3], flat[3:4], flat[4:6]]


def expected(g_a, g_b):
    """Mean on `shared` (both losses reach it), sum elsewhere (one loss or none)."""
    both = torch.stack([g_a, g_b])
    return torch.cat([both[:, 0:2].mean(0), both[:, 2:].sum(0)])


def merged_grads(model, mode):
    model.zero_grad(set_to_none=True)
    merged_gradient_loss(model, model.losses(), mode).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_default_merge_is_mean_over_shared_and_sum_over_the_rest():
    model = TwoHeads()
    g_a, g_b = hand_gradients()
    assert g_a @ g_b < 0                              # the losses conflict; without projection that is kept
    assert torch.equal(merged_grads(model, "pcgrad"), expected(g_a, g_b))
    # The parameter neither loss reaches gets a zero gradient, not None (the public wrapper sets
    # every gradient, so the optimizer's weight decay acts on it).
    assert model.idle.grad is not None and torch.equal(model.idle.grad, torch.zeros(2))


def test_projection_removes_the_conflicting_component():
    g_a, g_b = hand_gradients()
    dot = g_a @ g_b                                   # -6
    p_a = g_a - dot / (g_b @ g_b) * g_b
    p_b = g_b - dot / (g_a @ g_a) * g_a               # both against the original gradients
    assert abs(p_a @ g_b) < 1e-6 and abs(p_b @ g_a) < 1e-6
    got = merged_grads(TwoHeads(), "pcgrad-project")
    assert torch.allclose(got, expected(p_a, p_b), atol=1e-6)
    assert not torch.allclose(got, expected(g_a, g_b))


def test_projection_leaves_agreeing_gradients_alone():
    g = [torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])]
    params = [nn.Parameter(torch.zeros(2))]
    for project in (False, True):
        out = merge_gradients([[g[0]], [g[1]]], params, project=project)
        assert torch.equal(out[0], torch.tensor([1.5, 1.5]))


def test_the_surrogate_gradient_is_the_merged_gradient():
    model = TwoHeads()
    params = list(model.parameters())
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in model.losses()]
    merged = merge_gradients(grads, params, project=False)
    assert [g is None for g in grads[0]] == [False, False, True, True]    # what "shared" is read from
    got = merged_grads(model, "pcgrad")
    assert torch.equal(got, torch.cat([m.reshape(-1) for m in merged]))
    assert all(torch.equal(a, b) for a, b in zip(split(got), split(expected(*hand_gradients())), strict=True))


def test_frozen_parameters_are_left_out_and_unknown_modes_refused():
    model = TwoHeads()
    model.head_a.requires_grad_(False)
    merged_gradient_loss(model, model.losses(), "pcgrad").backward()
    assert model.head_a.grad is None
    with pytest.raises(ValueError, match="unknown gradient merge"):
        merged_gradient_loss(model, model.losses(), "sum")
