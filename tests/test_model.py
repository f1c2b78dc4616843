import pytest
import torch

from fmnist_hpo.config.sections import validate
from fmnist_hpo.data.datasets import FASHION_MNIST
from fmnist_hpo.training.model import ConvBlock, build_model, conv_dropout_rates, count_parameters, folded_batchnorm


def model_cfg(**values):
    return validate({"model": values}).model


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("variant", [{}, {"residual": True}, {"architecture": "dual_path"}, {"batchnorm": False}])
def test_every_depth_and_variant_gives_ten_logits(num_blocks: int, variant: dict):
    model = build_model(model_cfg(num_blocks=num_blocks, filters=4, units1=8, units2=8, **variant), FASHION_MNIST).eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_study_model_parameter_count():
    # 3 conv layers (bias-free, BatchNorm) + BN; dense 256->192->96 (bias-free, BatchNorm) + 96->10
    conv = (1 * 9 * 256 + 2 * 256) + 2 * (256 * 9 * 256 + 2 * 256)
    dense = (256 * 192 + 2 * 192) + (192 * 96 + 2 * 96) + (96 * 10 + 10)
    assert count_parameters(build_model(model_cfg(), FASHION_MNIST)) == conv + dense == 1_252_618


def test_without_batchnorm_layers_have_biases_and_no_norms():
    model = build_model(model_cfg(batchnorm=False, num_blocks=2, filters=4, units1=8, units2=8), FASHION_MNIST)
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in model.modules())
    assert count_parameters(model) == (9 * 4 + 4) + (4 * 9 * 4 + 4) + (4 * 8 + 8) + (8 * 8 + 8) + (8 * 10 + 10)


def test_residual_adds_a_projection_only_where_shapes_differ():
    model = build_model(model_cfg(residual=True, num_blocks=3, filters=4), FASHION_MNIST)
    blocks = list(model.towers[0])[:3]
    assert blocks[0].shortcut is None
    assert all(isinstance(b.shortcut, torch.nn.Identity) for b in blocks[1:])


@pytest.mark.parametrize(
    ("placement", "expected"),
    [("all", [0.2] * 4), ("none", [0.0] * 4), ("early", [0.2, 0, 0, 0]), ("late", [0, 0, 0, 0.2]),
     ("both", [0.2, 0, 0, 0.2]), ("middle", [0, 0.2, 0.2, 0])],
)
def test_dropout_placement(placement: str, expected: list):
    assert conv_dropout_rates(model_cfg(num_blocks=4, conv_dropout=0.2, dropout_placement=placement)) == expected


def test_per_block_dropout_rates():
    cfg = model_cfg(num_blocks=3, conv_dropout=[0.1, 0.2, 0.3])
    model = build_model(cfg, FASHION_MNIST)
    rates = [b.dropout.p for b in list(model.towers[0])[:3]]
    assert rates == [0.1, 0.2, 0.3]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_block_pools_before_relu_with_the_values_and_gradients_of_relu_first(channels_last: bool, dtype):
    """The block pools, then applies ReLU (a quarter of the elements); conv -> BN -> ReLU -> pool must give
    bitwise the same output, input gradient, weight gradients and running statistics."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pooled_first, relu_first = (ConvBlock(4, 6, 3, batchnorm=True, dropout=0.0, residual=False).to(memory_format=fmt)
                                for _ in range(2))
    relu_first.load_state_dict(pooled_first.state_dict())
    images = torch.randn(8, 4, 7, 7).contiguous(memory_format=fmt)  # 7x7: ceil_mode pools a ragged edge
    upstream = torch.randn(8, 6, 4, 4)

    def run(block: ConvBlock, forward) -> list[torch.Tensor]:
        x = images.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = forward(block, x)
        (y.float() * upstream).sum().backward()
        return [y, x.grad, *(p.grad for p in block.parameters()), block.norm.running_mean, block.norm.running_var]

    ours = run(pooled_first, ConvBlock.forward)
    theirs = run(relu_first, lambda b, x: b.pool(torch.relu(b.norm(b.conv(x)))))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("variant", [{}, {"residual": True}, {"architecture": "dual_path"}, {"batchnorm": False}])
def test_folded_batchnorm_is_the_same_function_without_batchnorm_layers(variant: dict, channels_last: bool):
    torch.manual_seed(0)
    model = build_model(model_cfg(num_blocks=3, filters=6, units1=8, units2=8, **variant), FASHION_MNIST)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(3):  # running statistics away from their initial 0 and 1
            model.train()(torch.randn(32, 1, 28, 28) * 2 + 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = folded_batchnorm(model)
    images = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model.eval()(images), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in folded.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model itself is untouched


def test_a_residual_block_adds_its_shortcut_after_relu_and_before_the_pool():
    torch.manual_seed(0)
    block = ConvBlock(6, 6, 3, batchnorm=True, dropout=0.0, residual=True).eval()
    x = torch.randn(4, 6, 7, 7)
    with torch.no_grad():
        expected = block.pool(torch.relu(block.norm(block.conv(x))) + x)
        assert torch.equal(block(x), expected)
        assert not torch.equal(block.pool(torch.relu(block.norm(block.conv(x)))) + block.pool(x), expected)
