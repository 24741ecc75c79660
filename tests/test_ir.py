import torch

from splitveil.commands.blocks import cut_costs
from splitveil.metrics import count_params, flops_per_image
from splitveil.models import create_model
from splitveil.models.ir import IRUnit


def test_ir152_blocks_follow_the_paper_numbering():
    # Table 2 of the GPZ paper: blocks 3, 8 | 25, 40, 48 | 49, 50, 51 on 64x64 inputs (stem = block 1)
    m = create_model("ir152", 10, (3, 64, 64), width=0.125)
    shapes = dict(enumerate((s for _, s in m.block_shapes()), 1))
    c = [8, 16, 32, 64]   # 64, 128, 256, 512 channels scaled by 1/8
    assert len(m.block_names) == 52 and m.block_names[0] == "stem" and m.block_names[-1] == "head"
    assert shapes[3] == (c[0], 32, 32) and shapes[4] == (c[0], 32, 32)
    assert shapes[5] == shapes[8] == shapes[12] == (c[1], 16, 16)
    assert shapes[13] == shapes[25] == shapes[40] == shapes[48] == (c[2], 8, 8)
    assert shapes[49] == shapes[50] == shapes[51] == (c[3], 4, 4)
    assert m.block_names[39] == "stage3_unit28" and m.block_names[49] == "stage4_unit2"
    ir50 = create_model("ir50", 10, (3, 64, 64), width=0.125)
    assert len(ir50.block_names) == 1 + 3 + 4 + 14 + 3 + 1


def test_ir_unit_is_bn_conv_prelu_strided_conv_bn_plus_shortcut():
    torch.manual_seed(0)
    u = IRUnit(4, 8, 2).eval()
    kinds = [type(m).__name__ for m in u.residual]
    assert kinds == ["BatchNorm2d", "Conv2d", "PReLU", "Conv2d", "BatchNorm2d"]
    assert u.residual[1].stride == (1, 1) and u.residual[3].stride == (2, 2)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        y = u(x)
        assert y.shape == (2, 8, 5, 5)
        assert torch.allclose(y, u.residual(x) + u.shortcut(x))    # no activation after the sum
    same = IRUnit(8, 8, 2).eval()
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():   # identity shortcut subsampled by the stride
        assert torch.allclose(same(x) - same.residual(x), x[:, :, ::2, ::2])


def test_ir_full_width_parameter_count_and_trains():
    # IR-152 with a 512-d embedding and 10 classes: the paper's "over 78% of parameters on the edge" at block 49
    m = create_model("ir152", 10, (3, 64, 64))
    rows = cut_costs(m)
    total = count_params(m)
    assert rows[-1]["edge_params"] == total == 62_091_978
    assert 0.78 <= rows[48]["edge_params"] / total < 0.79
    tiny = create_model("ir50", 3, (1, 28, 28), width=0.0625)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 3, (8,))
    loss0 = None
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(tiny(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss0 = loss0 if loss0 is not None else loss.item()
    assert loss.item() < loss0


def test_cut_costs_are_cumulative_and_match_the_edge_counter():
    for name, shape in (("vgg11_bn", (3, 32, 32)), ("ir50", (3, 32, 32)), ("vit", (3, 32, 32))):
        m = create_model(name, 10, shape, width=0.125)
        rows = cut_costs(m)
        assert len(rows) == len(m.block_names)
        children = list(m.blocks.children())
        for k in (1, len(rows) // 2, len(rows)):
            edge = torch.nn.Sequential(*children[:k])
            assert rows[k - 1]["edge_params"] == count_params(edge)
            assert rows[k - 1]["edge_flops"] == flops_per_image(edge, shape)
        assert all(b["edge_flops"] > a["edge_flops"] for a, b in zip(rows, rows[1:]) if b["block"] != "head")


def test_cli_blocks_prints_params_and_flops(capsys):
    from splitveil.cli import main

    assert main(["blocks", "ir152", "--input", "3,64,64", "--width", "0.125"]) == 0
    out = capsys.readouterr().out
    assert "edge FLOPs / image" in out and "| 40 | stage3_unit28 | (32, 8, 8) |" in out
    assert "| 50 | stage4_unit2 | (64, 4, 4) |" in out
