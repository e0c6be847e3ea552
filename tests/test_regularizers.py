"""The two penalties against naive loop-over-samples references (METHOD.md s3)."""

import pytest
import torch

from sae.regularizers import batch_active, l1_l2_ratio, off_support_l1


def naive_masked_units(support: torch.Tensor, n: int, mask: bool) -> set[int]:
    if not mask:
        return set(range(n))
    return {int(j) for row in support for j in row}


def naive_off_support(pre, support, mask):
    n = pre.shape[1]
    units = naive_masked_units(support, n, mask)
    total = 0.0
    for i in range(pre.shape[0]):
        chosen = {int(j) for j in support[i]}
        for j in range(n):
            if j in units and j not in chosen:
                total += max(float(pre[i, j]), 0.0)
    return total / pre.shape[0]


def naive_ratio(pre, support, mask, eps=1e-8):
    n = pre.shape[1]
    units = sorted(naive_masked_units(support, n, mask))
    total = 0.0
    for i in range(pre.shape[0]):
        z = [max(float(pre[i, j]), 0.0) for j in units]
        l1 = sum(z)
        l2 = sum(v * v for v in z) ** 0.5
        total += l1 / (l2 + eps)
    return total / pre.shape[0]


def topk_support(pre, k):
    return pre.topk(k, dim=1).indices


CASES = [  # (batch, n, k)
    (6, 20, 3),
    (1, 12, 4),  # a batch of one
    (5, 8, 8),  # k = n: every unit is on every support
    (16, 64, 2),  # many units never selected in the batch
]


@pytest.mark.parametrize("batch,n,k", CASES)
@pytest.mark.parametrize("mask", [True, False])
def test_penalties_match_naive_reference(batch, n, k, mask):
    gen = torch.Generator().manual_seed(batch * 100 + n + k)
    pre = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    support = topk_support(pre, k)
    assert off_support_l1(pre, support, mask).item() == pytest.approx(
        naive_off_support(pre, support, mask), rel=1e-10, abs=1e-12)
    assert l1_l2_ratio(pre, support, mask).item() == pytest.approx(
        naive_ratio(pre, support, mask), rel=1e-10)


def test_mask_changes_the_value_when_units_are_inactive():
    pre = torch.rand(4, 32, dtype=torch.float64) + 0.1  # all units positive
    support = topk_support(pre, 2)
    assert off_support_l1(pre, support, False) > off_support_l1(pre, support, True)


def test_all_zero_activations_give_zero_and_finite_gradients():
    pre = -torch.rand(3, 10, dtype=torch.float64).requires_grad_()
    support = topk_support(pre.detach(), 2)
    for fn in (off_support_l1, l1_l2_ratio):
        for mask in (True, False):
            value = fn(pre, support, mask)
            (grad,) = torch.autograd.grad(value, pre)
            assert value.item() == 0.0
            assert torch.isfinite(grad).all()


def test_ratio_bounds_and_effective_units():
    """Ratio in [1, sqrt(|M|)]; equals sqrt(m) for m equal active values."""
    pre = torch.zeros(1, 16, dtype=torch.float64)
    pre[0, :4] = 2.0
    support = torch.tensor([[0, 1, 2, 3]])
    assert l1_l2_ratio(pre, support, mask=False).item() == pytest.approx(2.0, rel=1e-6)
    pre = torch.rand(8, 16, dtype=torch.float64)
    support = topk_support(pre, 3)
    value = l1_l2_ratio(pre, support, mask=True).item()
    assert 1.0 <= value <= batch_active(support, 16).sum().item() ** 0.5 + 1e-9


@pytest.mark.parametrize("fn", [off_support_l1, l1_l2_ratio])
def test_mask_blocks_gradient_outside_batch_active_units(fn):
    torch.manual_seed(0)
    pre = (torch.rand(4, 40, dtype=torch.float64) + 0.05).requires_grad_()  # every z_ij > 0
    support = topk_support(pre.detach(), 2)
    active = batch_active(support, 40)
    assert (~active).sum() > 0
    (grad_on,) = torch.autograd.grad(fn(pre, support, True), pre)
    (grad_off,) = torch.autograd.grad(fn(pre, support, False), pre)
    assert torch.all(grad_on[:, ~active] == 0)
    assert torch.all(grad_off[:, ~active] != 0)
    assert torch.any(grad_on[:, active] != 0)


def test_batch_active_is_the_union_of_supports():
    support = torch.tensor([[0, 3], [3, 5]])
    assert batch_active(support, 7).tolist() == [True, False, False, True, False, True, False]
