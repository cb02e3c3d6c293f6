import itertools

import pytest
import torch

import sau

GRID = list(itertools.product((3, 5), (2, 4), sau.WINDOWS))  # k, s, window


def _inputs(k, s, dtype, B=2, C=3, H=3, W=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, dtype=dtype, generator=g).requires_grad_()
    kern = torch.softmax(torch.randn(B, k * k, s * H, s * W, dtype=dtype, generator=g), 1).requires_grad_()
    grad = torch.randn(B, C, s * H, s * W, dtype=dtype, generator=g)
    return x, kern, grad


def _run(x, kern, grad, s, window, impl):
    y = sau.sau_upsample(x, kern, s, window, impl)
    return (y, *torch.autograd.grad(y, (x, kern), grad))


@pytest.mark.parametrize("k,s,window", GRID)
def test_three_impls_agree_float64(k, s, window):
    # odd sizes, B > 1; forward and both gradients
    x, kern, grad = _inputs(k, s, torch.float64)
    ref = _run(x, kern, grad, s, window, "naive")
    for impl in ("vectorized", "lean"):
        for a, b in zip(ref, _run(x, kern, grad, s, window, impl)):
            assert a.shape == b.shape
            assert (a - b).abs().max() < 1e-10, (impl, k, s, window)


@pytest.mark.parametrize("k,s,window", GRID)
def test_lean_matches_vectorized_float32(k, s, window):
    x, kern, grad = _inputs(k, s, torch.float32, B=3, C=4, H=7, W=9, seed=1)
    for a, b in zip(_run(x, kern, grad, s, window, "vectorized"), _run(x, kern, grad, s, window, "lean")):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", sau.WINDOWS)
def test_lean_channel_chunks_match_one_chunk(window, monkeypatch):
    # CPU lean works on channel chunks of ~_CHUNK_BYTES; force 1-channel and 2-channel chunks
    x, kern, grad = _inputs(5, 2, torch.float64, C=5)
    ref = _run(x, kern, grad, 2, window, "naive")
    for chunk_bytes in (1, 2 * 2 * 3 * 5 * 8):
        monkeypatch.setattr(sau, "_CHUNK_BYTES", chunk_bytes)
        for a, b in zip(ref, _run(x, kern, grad, 2, window, "lean")):
            assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("window", sau.WINDOWS)
def test_lean_plain_autograd_matches_custom_backward(window):
    x, kern, grad = _inputs(5, 2, torch.float64)
    y = sau._sau_lean(x, kern, 2, 5, window, autograd_function=False)
    for a, b in zip((y, *torch.autograd.grad(y, (x, kern), grad)), _run(x, kern, grad, 2, window, "lean")):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("k,s,window", [(3, 2, "expanded"), (3, 2, "input"), (5, 2, "expanded"), (3, 4, "expanded")])
def test_lean_gradcheck(k, s, window):
    # kernels need not be normalised for the operator itself
    x = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    kern = torch.randn(1, k * k, 3 * s, 2 * s, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sau.sau_upsample(a, b, s, window, "lean"), (x, kern))


def test_expanded_window_is_nearest_with_centre_kernel():
    # a one-hot kernel at the centre tap reads the expanded map at l' itself: nearest upsampling
    x = torch.randn(2, 3, 4, 5)
    kern = torch.zeros(2, 25, 8, 10)
    kern[:, 12] = 1
    for window in sau.WINDOWS:
        y = sau.sau_upsample(x, kern, 2, window)
        assert torch.equal(y, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


def test_errors_name_the_file_and_value():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"sau.py: window='other'"):
        sau.sau_upsample(x, torch.rand(1, 9, 6, 6), 2, window="other")
    with pytest.raises(ValueError, match=r"sau.py: impl='fast'"):
        sau.sau_upsample(x, torch.rand(1, 9, 6, 6), 2, impl="fast")
    with pytest.raises(ValueError, match=r"sau.py: kernels has 8 channels"):
        sau.sau_upsample(x, torch.rand(1, 8, 6, 6), 2)
    with pytest.raises(ValueError, match=r"do not match x"):
        sau.sau_upsample(x, torch.rand(1, 9, 5, 6), 2)
    with pytest.raises(ValueError, match=r"sau.py: unknown upsampler 'magic'"):
        sau.make_upsampler("magic", 8)


@pytest.mark.parametrize("window", sau.WINDOWS)
def test_sau_module_shape_and_softmax_kernels(window):
    m = sau.SAU(8, scale=2, k=5, compressed=4, window=window)
    x = torch.randn(2, 8, 5, 7)
    kern = m.kernels(x)
    assert kern.shape == (2, 25, 10, 14)
    assert torch.allclose(kern.sum(1), torch.ones(2, 10, 14), atol=1e-6)
    assert (kern >= 0).all()
    y = m(x)
    assert y.shape == (2, 8, 10, 14)
    assert torch.allclose(y, sau.sau_upsample(x, kern, 2, window, "naive"), atol=1e-5)


def test_sau_scale_4():
    m = sau.SAU(4, scale=4, k=3, compressed=4)
    assert m(torch.randn(1, 4, 3, 5)).shape == (1, 4, 12, 20)


@pytest.mark.parametrize("name", sau.UPSAMPLERS)
def test_zoo_shape_and_gradients(name):
    torch.manual_seed(0)
    m = sau.make_upsampler(name, 16)
    x = torch.randn(2, 16, 6, 10, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 16, 12, 20)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)
    # one SGD step changes a learnable upsampler's output: it trains
    if list(m.parameters()):
        before = y.detach()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.1 * p.grad
        assert not torch.allclose(m(x).detach(), before)


def test_zoo_parameter_counts_match_table_12():
    # GauGAN Cityscapes (93.05M) + four upsamplers at 1024, 512, 256, 128 channels, Table 12 (one decimal)
    table = sau.table12_check()
    for name, paper in [("deconv", "98.6"), ("pixelshuffle", "143.2"), ("attention", "97.4"), ("sau", "93.4")]:
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        four = float(row.split("|")[3].strip().rstrip("M"))
        assert f"{four:.1f}" == paper, row


@pytest.mark.parametrize("impl", sau.IMPLS)
def test_windows_read_3x3_or_5x5_input_pixels(impl):
    # the input pixels an output pixel l' reads (non-zero gradient, all kernel taps > 0), against the two rules
    # written out: "expanded" reads input row floor((i' + p) / s), "input" reads floor(i' / s) + p, p in -2..2
    k, s, H, W = 5, 2, 9, 9
    x = torch.randn(1, 1, H, W, dtype=torch.float64, requires_grad=True)
    kern = torch.softmax(torch.randn(1, k * k, s * H, s * W, dtype=torch.float64), 1)
    for window in sau.WINDOWS:
        for i2, j2 in [(8, 8), (9, 9), (8, 9)]:  # both output phases, away from the border
            g, = torch.autograd.grad(sau.sau_upsample(x, kern, s, window, impl)[0, 0, i2, j2], x)
            read = {tuple(ij) for ij in (g[0, 0] != 0).nonzero().tolist()}
            rows = lambda i: {(i + p) // s for p in range(-2, 3)} if window == "expanded" else \
                {i // s + p for p in range(-2, 3)}
            want = {(a, b) for a in rows(i2) for b in rows(j2)}
            assert read == want, (window, i2, j2)
            assert len(want) == (9 if window == "expanded" else 25)


def test_sau_windows_give_different_outputs():
    torch.manual_seed(0)
    a = sau.SAU(8, window="expanded")
    b = sau.SAU(8, window="input")
    b.load_state_dict(a.state_dict())  # same kernels: only the window rule differs
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(a.kernels(x), b.kernels(x))
    assert (a(x) - b(x)).abs().max() > 1e-3


def test_make_upsampler_passes_the_window():
    for window in sau.WINDOWS:
        assert sau.make_upsampler("sau", 8, window=window).window == window
    for name in ("sau", "nearest"):  # a typo is an error whatever the upsampler
        with pytest.raises(ValueError, match=r"sau.py: window='inputs'"):
            sau.make_upsampler(name, 8, window="inputs")
    with pytest.raises(ValueError, match=r"sau.py: window='inputs'"):
        sau.SAU(8, window="inputs")
