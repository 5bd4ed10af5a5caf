"""``ring_adasplash.entmax`` over any tensor and dim, against the ``entmax`` package."""
from __future__ import annotations

import pytest
import torch

from ring_adasplash.entmax_function import entmax, entmax15, sparsemax

oracle = pytest.importorskip("entmax")


def _oracle(x, alpha, dim):
    if alpha == 1.5:
        return oracle.entmax15(x, dim=dim)
    if alpha == 2.0:
        return oracle.sparsemax(x, dim=dim)
    return oracle.entmax_bisect(x, alpha=alpha, dim=dim, n_iter=200)


def _rows(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "random": 3 * torch.randn(3, 5, 40, generator=g),
        "offset +1e4": torch.randn(2, 40, generator=g) + 1e4,
        "ties and zeros": torch.tensor([[0.0] * 40, [2.0] * 3 + [0.0] * 37]),
        "flat, 4096 wide": 0.01 * torch.randn(2, 4096, generator=g),
        "one key": torch.tensor([[50.0] + [0.0] * 39]),
    }


@pytest.mark.parametrize("alpha", (1.01, 1.1, 1.25, 1.5, 1.75, 2.0))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_matches_the_entmax_package(alpha, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    for name, x in _rows(0).items():
        x = x.to(dtype)
        for dim in range(-1, -x.dim() - 1, -1):
            got = entmax(x, alpha, dim)
            want = _oracle(x.double(), alpha, dim)
            assert got.dtype == dtype and got.shape == x.shape
            assert (got.double() - want).abs().max().item() <= tol, (name, dim)


@pytest.mark.parametrize("alpha", (1.25, 1.5, 2.0))
def test_gradients_match_the_entmax_package(alpha):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 30, generator=g, dtype=torch.float64)
    grad = torch.randn(4, 6, 30, generator=g, dtype=torch.float64)
    for dim in (0, 1, 2):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        (entmax(a, alpha, dim) * grad).sum().backward()
        (_oracle(b, alpha, dim) * grad).sum().backward()
        assert (a.grad - b.grad).abs().max().item() < 1e-8
    assert torch.autograd.gradcheck(lambda t: entmax(t, alpha, 1), (x[:2, :, :7].clone().requires_grad_(),))


def test_named_forms_and_bad_input():
    x = torch.randn(3, 9)
    assert torch.equal(entmax15(x), entmax(x, 1.5)) and torch.equal(sparsemax(x, 0), entmax(x, 2.0, 0))
    assert entmax(torch.randn(2, 0), 1.5).shape == (2, 0)
    half = entmax(torch.randn(7, 3, dtype=torch.bfloat16), 1.5, 0)
    assert half.dtype == torch.bfloat16 and (half.float().sum(0) - 1).abs().max() < 1e-2
    with pytest.raises(ValueError, match="alpha"):
        entmax(x, 1.0)
    with pytest.raises(ValueError, match="dim"):
        entmax(x, 1.5, dim=2)
    with pytest.raises(TypeError, match="floating"):
        entmax(torch.ones(3, dtype=torch.int64))


def special_rows():
    """A row with a NaN, a row of -inf (nothing to attend to), a row with masked (-inf) entries."""
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    x[0, 3] = float("nan")
    x[1] = float("-inf")
    x[2, :4] = float("-inf")
    return x


def check_special_rows(x, alpha):
    """NaN and all -inf rows come out NaN (as softmax gives); masked entries get p = 0 and the
    rest match the package on the entries left."""
    p = entmax(x, alpha).cpu()
    x = x.cpu()
    assert p[:2].isnan().all()
    assert torch.equal(p[2, :4], torch.zeros(4))
    want = _oracle(x[2:, 4:].double(), alpha, -1)
    assert (p[2:, 4:].double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("alpha", (1.25, 1.5, 2.0))
def test_nan_and_masked_rows(alpha):
    check_special_rows(special_rows(), alpha)


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", (1.01, 1.25, 1.5, 2.0))
def test_gpu_row_kernel_matches_the_entmax_package(alpha):
    """The Triton row kernel on the GPU: rows kept in registers and rows longer than
    ``ENTMAX_ROW_BLOCK``, float32 and bf16 inputs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    for name, x in (*_rows(0).items(), ("long", torch.randn(3, 20000, generator=torch.Generator().manual_seed(4)))):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            xd = x.to("cuda", dtype)
            got = entmax(xd, alpha)
            assert got.dtype == dtype and got.is_cuda
            assert (got.double().cpu() - _oracle(xd.double().cpu(), alpha, -1)).abs().max().item() <= tol, (name, dtype)
    check_special_rows(special_rows().cuda(), alpha)
