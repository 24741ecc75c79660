import torch

from splitveil.models.ir_decoder import IRInversionDecoder, ReversedIRUnit


def test_reversed_ir_unit_upsamples_with_a_transposed_shortcut():
    torch.manual_seed(0)
    u = ReversedIRUnit(8, 4, up=True).eval()
    kinds = [type(m).__name__ for m in u.residual]
    assert kinds == ["BatchNorm2d", "ConvTranspose2d", "PReLU", "ConvTranspose2d", "BatchNorm2d"]
    assert isinstance(u.shortcut[0], torch.nn.ConvTranspose2d) and u.shortcut[0].stride == (2, 2)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        y = u(x)
        assert y.shape == (2, 4, 8, 8) and torch.allclose(y, u.residual(x) + u.shortcut(x))
    same = ReversedIRUnit(4, 4, up=False).eval()
    with torch.no_grad():
        x = torch.randn(1, 4, 5, 5)
        assert torch.allclose(same(x) - same.residual(x), x)     # identity shortcut


def test_ir_decoder_shapes_range_and_fit():
    torch.manual_seed(0)
    for feat, img in (((64, 4, 4), (3, 64, 64)), ((16, 8, 8), (3, 32, 32)), ((10,), (1, 28, 28)), ((65, 32), (3, 32, 32))):
        dec = IRInversionDecoder(feat, img, channels=32, units=1)
        out = dec(torch.randn(2, *feat))
        assert out.shape == (2, *img) and 0 <= out.min() and out.max() <= 1
    # the IR-152 block-50 shape (512, 4, 4) -> 64x64 has log2(64/4) = 4 upsampling stages
    dec = IRInversionDecoder((512, 4, 4), (3, 64, 64), channels=64, units=2)
    assert sum(isinstance(m, ReversedIRUnit) and isinstance(m.shortcut, torch.nn.Sequential)
               and isinstance(m.shortcut[0], torch.nn.ConvTranspose2d) for m in dec.body) == 4
    # it learns: fit a fixed random map z -> x for a few steps
    z, x = torch.randn(16, 8, 4, 4), torch.rand(16, 1, 16, 16)
    dec = IRInversionDecoder((8, 4, 4), (1, 16, 16), channels=32, units=1)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(dec(z), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
