"""Tests for models/: parameter counts, shapes, gradients, the factory, the
batch-norm parameter list, determinism and torch.func friendliness."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, stack_module_state, vmap

from powergossip import models

IMAGE_MODELS = ["resnet20", "resnet18", "vgg16", "small_cnn"]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet20", 272_474),
        ("resnet18", 11_173_962),
        ("vgg16", 14_728_266),
        ("small_cnn", 422_218),
    ],
)
def test_parameter_counts_cifar_shape(name, expected):
    assert num_params(models.build(name, in_channels=3, num_classes=10)) == expected


def test_parameter_counts_grayscale_and_small_cnn_budget():
    # One input channel removes (3 - 1) * 9 * stem_width conv weights.
    assert num_params(models.build("resnet20", in_channels=1)) == 272_474 - 2 * 9 * 16
    assert num_params(models.build("resnet18", in_channels=1)) == 11_173_962 - 2 * 9 * 64
    small = models.build("small_cnn", in_channels=1, image_size=28)
    assert num_params(small) == 421_642
    assert num_params(small) <= 500_000
    shapes = [p.shape for p in small.parameters()]
    assert any(len(s) >= 2 for s in shapes) and any(len(s) == 1 for s in shapes)


def test_lstm_parameter_count():
    vocab = 100
    model = models.build("lstm", vocab_size=vocab)
    h, layers = 650, 3
    # Tied decoder weight counted once: embedding + decoder bias + LSTM.
    assert num_params(model) == vocab * h + vocab + layers * (8 * h * h + 8 * h)


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
def test_image_model_forward_backward(name, channels, size):
    torch.manual_seed(0)
    model = models.build(name, in_channels=channels, num_classes=10, image_size=size)
    x = torch.randn(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    # Gradients reach the first layer (not all zero).
    first = next(model.parameters())
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["resnet20", "small_cnn"])
def test_channels_last_matches(name):
    torch.manual_seed(0)
    model = models.build(name).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_lstm_shapes_tied_weights_and_hidden_state():
    torch.manual_seed(0)
    vocab, batch, steps = 37, 2, 6
    model = models.build("lstm", vocab_size=vocab)
    assert model.decoder.weight is model.embedding.weight
    assert model.embedding.weight.shape == (vocab, 650)
    assert model.rnn.num_layers == 3 and model.rnn.hidden_size == 650
    assert model.rnn.dropout == pytest.approx(0.4) and model.drop.p == pytest.approx(0.4)
    assert model.rnn.batch_first

    tokens = torch.randint(0, vocab, (batch, steps))
    logits, (h, c) = model(tokens)
    assert logits.shape == (batch, steps, vocab)
    assert h.shape == c.shape == (3, batch, 650)
    zeros = model.init_hidden(batch, torch.device("cpu"))
    assert all(z.shape == (3, batch, 650) and not z.any() for z in zeros)

    # Gradient of the tied weight receives contributions from both uses.
    logits.sum().backward()
    assert torch.isfinite(model.embedding.weight.grad).all()

    # Carrying the hidden state over a split sequence equals one long pass
    # (eval mode: no dropout), and starting from zeros differs.
    model.eval()
    with torch.no_grad():
        full, _ = model(tokens, model.init_hidden(batch, "cpu"))
        first, hidden = model(tokens[:, :3])
        second, _ = model(tokens[:, 3:], hidden)
        fresh, _ = model(tokens[:, 3:])
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-5, atol=1e-5)
    assert (fresh - full[:, 3:]).abs().max() > 1e-4


def test_lstm_unfused_path_matches_fused():
    torch.manual_seed(0)
    model = models.build("lstm", vocab_size=20).eval()
    tokens = torch.randint(0, 20, (3, 5))
    hidden = tuple(torch.randn(3, 3, 650) for _ in range(2))
    with torch.no_grad():
        model.fused = True
        ref, (h_ref, c_ref) = model(tokens, hidden)
        model.fused = False
        out, (h, c) = model(tokens, hidden)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, c_ref, rtol=1e-4, atol=1e-5)


def test_factory_names_and_errors():
    assert set(models.NAMES) == {"resnet20", "resnet18", "vgg16", "small_cnn", "lstm"}
    with pytest.raises(ValueError) as info:
        models.build("resnet21")
    for name in models.NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="vocab_size"):
        models.build("lstm")
    assert num_params(models.build("ResNet20")) == 272_474
    assert isinstance(models.build("SMALL_CNN", in_channels=1), models.SmallCNN)
    assert isinstance(models.build("Lstm", vocab_size=10), models.LSTMLanguageModel)
    out = models.build("small_cnn", num_classes=7)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_no_weight_decay_parameter_names_resnet20():
    model = models.build("resnet20")
    names = models.no_weight_decay_parameter_names(model)
    bn_layers = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # stem + 2 per block * 9 blocks + 2 projection shortcuts
    assert len(bn_layers) == 21
    assert len(names) == 2 * len(bn_layers) == 42
    assert names == {f"{layer}.{p}" for layer in bn_layers for p in ("weight", "bias")}
    params = dict(model.named_parameters())
    assert all(params[n].ndim == 1 for n in names)
    conv_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(conv_weights) == 21 and not (conv_weights & names)
    assert "fc.weight" not in names and "fc.bias" not in names
    # Models without batch norm decay everything.
    assert models.no_weight_decay_parameter_names(models.build("small_cnn")) == set()
    assert models.no_weight_decay_parameter_names(models.build("lstm", vocab_size=5)) == set()


@pytest.mark.parametrize("name", ["resnet20", "small_cnn", "lstm"])
def test_same_seed_same_parameters(name):
    def make(seed):
        torch.manual_seed(seed)
        return models.build(name, vocab_size=11)

    a, b, c = make(3), make(3), make(4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _stacked(modules):
    params, buffers = stack_module_state(modules)
    base = copy.deepcopy(modules[0]).to("meta")
    return base, params, buffers


def test_vmap_functional_call_small_cnn():
    torch.manual_seed(0)
    copies = [models.build("small_cnn", in_channels=1) for _ in range(2)]
    base, params, buffers = _stacked(copies)
    x = torch.randn(2, 4, 1, 28, 28)  # [worker, batch, C, H, W]

    def forward(p, b, xb):
        return functional_call(base, (p, b), (xb,))

    out = vmap(forward)(params, buffers, x)
    ref = torch.stack([m(x[i]) for i, m in enumerate(copies)])
    assert out.shape == (2, 4, 10)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (out[0] - out[1]).abs().max() > 1e-3  # the two copies really differ

    # Per-worker gradients through vmap(grad(...)) match autograd on each copy.
    y = torch.randint(0, 10, (2, 4))

    def loss(p, b, xb, yb):
        return nn.functional.cross_entropy(forward(p, b, xb), yb)

    grads = vmap(grad(loss))(params, buffers, x, y)
    for i, m in enumerate(copies):
        nn.functional.cross_entropy(m(x[i]), y[i]).backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(grads[n][i], p.grad, rtol=1e-4, atol=1e-6)


def test_vmap_resnet20_train_mode_updates_stacked_bn_buffers():
    torch.manual_seed(0)
    copies = [models.build("resnet20") for _ in range(2)]
    base, params, buffers = _stacked(copies)
    x = torch.randn(2, 3, 3, 32, 32)
    out = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)))(params, buffers, x)
    ref = torch.stack([m(x[i]) for i, m in enumerate(copies)])  # train mode: updates stats
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for i, m in enumerate(copies):
        torch.testing.assert_close(buffers["bn1.running_mean"][i], m.bn1.running_mean)
    assert buffers["bn1.running_mean"].abs().sum() > 0


def test_vmap_functional_call_lstm():
    torch.manual_seed(0)
    copies = [models.build("lstm", vocab_size=30).eval() for _ in range(2)]
    base, params, buffers = _stacked(copies)
    tokens = torch.randint(0, 30, (2, 3, 4))
    out = vmap(lambda p, b, t: functional_call(base, (p, b), (t,))[0])(params, buffers, tokens)
    ref = torch.stack([m(tokens[i])[0] for i, m in enumerate(copies)])
    assert out.shape == (2, 3, 4, 30)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_no_torchvision_import():
    import pathlib
    import re

    root = pathlib.Path(models.__file__).parent
    files = list(root.glob("*.py"))
    assert len(files) >= 5
    pattern = re.compile(r"^\s*(import|from)\s+torchvision", re.MULTILINE)
    for path in files:
        assert not pattern.search(path.read_text()), path


def test_compile_replicas_needs_the_graph_layout():
    from powergossip.models.stacked import StackedReplicas

    with pytest.raises(ValueError, match="compile_replicas compiles each replica's forward for the CUDA graph"):
        StackedReplicas(models.build("small_cnn"), 2, torch.device("cpu"), "loop", compile_replicas=True)
