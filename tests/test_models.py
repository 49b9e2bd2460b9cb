import pytest
import torch

from largebatch.errors import UsageError
from largebatch.models import MODELS, Normalize, build_model, count_parameters


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_image_models_map_a_batch_to_logits(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 7, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_resnet18_uses_the_large_stem_for_big_images():
    model = build_model("resnet18", (3, 96, 96), 5)
    assert model(torch.rand(2, 3, 96, 96)).shape == (2, 5)
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_mlp_accepts_vector_inputs():
    model = build_model("mlp", (40,), 10, mean=[0.0], std=[1.0])
    assert model(torch.randn(3, 40)).shape == (3, 10)


def test_c1_follows_the_paper_layout():
    model = build_model("c1", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(64, (5, 5))] * 2
    assert [lin.out_features for lin in linears] == [384, 192, 10]
    # 32 -> 16 -> 8 after the two 3/2 pools: the first FC reads 64 * 8 * 8 features.
    assert linears[0].in_features == 64 * 8 * 8


def test_c2_rejects_images_too_small_for_its_unpadded_convs():
    with pytest.raises(UsageError, match="16x16"):
        build_model("c2", (1, 8, 8), 10)


def test_conv_models_reject_vector_inputs():
    with pytest.raises(UsageError, match="mlp"):
        build_model("c1", (40,), 10)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(UsageError, match="resnet20"):
        build_model("vgg", (1, 28, 28), 10)


def test_normalize_is_per_channel_and_has_no_parameters():
    layer = Normalize([0.5, 0.0], [0.5, 2.0], ndim=3)
    x = torch.ones(1, 2, 2, 2)
    y = layer(x)
    assert torch.allclose(y[0, 0], torch.ones(2, 2))
    assert torch.allclose(y[0, 1], torch.full((2, 2), 0.5))
    assert count_parameters(layer) == 0
