"""The per-example gradient engine (qem.per_example): conv patches against F.unfold and the
convolution itself, the layer registry (a new layer type is one registration), the capture of
backprops across in-place operations, and the thread count on a shared machine."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qem.curvature import KFAC
from qem.errors import UnsupportedModelError
from qem.losses import cross_entropy
from qem.per_example import backpropagate, free_cores, record_calls, shared_machine_threads
from qem.per_example import threads as threads_module
from qem.per_example.layers import LayerType, check_layer, layer_type, registry
from qem.per_example.layers.conv2d import conv_patches
from qem.subspace import Kronecker, Subspace

F64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_conv_patches_are_f_unfold_exactly(dtype):
    """Zero padding (ints, 'same', 'valid'), strides, dilations, channels-last inputs: the
    strided view copies the same values F.unfold computes, so equality is exact."""
    torch.manual_seed(0)
    cases = itertools.product([0, 1, (2, 1), "same", "valid"], [1, 2], [1, 2])
    for padding, stride, dilation in cases:
        if padding == "same" and stride != 1:
            continue  # torch refuses 'same' with strides
        conv = nn.Conv2d(3, 4, (3, 2), padding=padding, stride=stride, dilation=dilation)
        x = torch.randn(5, 3, 9, 8, dtype=dtype)
        if padding == "same":
            width = dilation * (2 - 1)  # torch puts the odd pixel on the right
            pads = (width // 2, width - width // 2, dilation, dilation)  # left, right, top, bottom
            reference = F.unfold(F.pad(x, pads), (3, 2), dilation=dilation)
        else:
            pad = (0, 0) if padding == "valid" else conv.padding
            reference = F.unfold(x, (3, 2), dilation=dilation, padding=pad, stride=stride)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            got = conv_patches(conv, x.contiguous(memory_format=memory_format))
            assert torch.equal(got, reference), (padding, stride, dilation, memory_format)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_patches_reproduce_the_convolution_for_every_padding_mode(mode):
    """out = W_flat patches + b, in float64 (a sum of 3*3*2 = 18 products: agreement to 1e-12
    is rounding; a wrong patch would be off by O(1))."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, (3, 2), padding=(1, 2), stride=(1, 2), padding_mode=mode).double()
    x = torch.randn(5, 3, 7, 8, dtype=F64)
    out = conv(x)
    patches = conv_patches(conv, x)
    rebuilt = conv.weight.flatten(1) @ patches + conv.bias[:, None]
    torch.testing.assert_close(rebuilt.reshape(out.shape), out, atol=1e-12, rtol=0)


def test_the_registry_resolves_subclasses_and_names_what_it_supports():
    attention = nn.MultiheadAttention(4, 2)
    assert type(attention.out_proj) is not nn.Linear  # NonDynamicallyQuantizableLinear
    assert layer_type(attention.out_proj) is layer_type(nn.Linear(2, 2))
    assert layer_type(nn.Conv2d(1, 1, 1)) is not layer_type(nn.Linear(2, 2))
    assert layer_type(nn.LayerNorm(3)) is None
    with pytest.raises(UnsupportedModelError, match=r"LayerNorm.*nn\.Conv2d and nn\.Linear"):
        check_layer("norm", nn.LayerNorm(3))
    with pytest.raises(UnsupportedModelError, match="groups=2"):
        check_layer("conv", nn.Conv2d(2, 2, 1, groups=2))


class Conv1dPositions(LayerType):
    """A layer type written as a new file would be: nn.Conv1d (no padding, stride 1), whose
    positions are the output samples and a_t the (in, k) window behind sample t."""

    def inputs(self, module: nn.Module, activation: torch.Tensor) -> torch.Tensor:
        windows = activation.unfold(2, module.kernel_size[0], 1)  # (B, in, L, k)
        return windows.permute(0, 2, 1, 3).reshape(activation.shape[0], windows.shape[2], -1)

    def backprops(self, module: nn.Module, backprop: torch.Tensor) -> torch.Tensor:
        return backprop.transpose(1, 2)


def test_a_new_layer_type_is_one_registration(monkeypatch):
    """Registering Conv1d makes the Kronecker subspace span it, with per-example gradients equal
    to the generic torch.func path (float64: equal to rounding, 1e-12), and gives K-FAC its
    input factor (the sum over examples and positions of a a^T, checked against a loop)."""
    monkeypatch.setitem(registry._TYPES, nn.Conv1d, Conv1dPositions())
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()
    x, y = torch.randn(7, 2, 6, dtype=F64), torch.randint(0, 4, (7,))
    subspace = Kronecker(model, 10, seed=0)
    assert [layer.module for layer in subspace.layers] == ["0", "3"]
    got = subspace.per_example_gradients(model, cross_entropy, x, y)
    expected = Subspace.per_example_gradients(subspace, model, cross_entropy, x, y)
    assert got.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)

    curvature = KFAC(0.1, batch_size=4, progress=False)
    factors = curvature.estimate(model, cross_entropy, subspace.layers, (x, y))
    conv = model[0]
    expected_input = torch.zeros(7, 7, dtype=F64)
    for i, t in itertools.product(range(7), range(4)):
        a = torch.cat([x[i, :, t : t + 3].reshape(-1), torch.ones(1, dtype=F64)])
        expected_input += torch.outer(a, a)
    assert factors["0"].shape == (conv.out_channels, 7)
    torch.testing.assert_close(factors["0"].input, expected_input / 7, atol=1e-12, rtol=0)


def inplace_pair() -> tuple[nn.Module, nn.Module]:
    """The same network twice, with ReLU(inplace=True) and ReLU() after each spanned layer."""
    torch.manual_seed(3)
    plain = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)
    ).double()
    inplace = nn.Sequential(*[nn.ReLU(True) if isinstance(m, nn.ReLU) else m for m in plain])
    return plain, inplace


def test_backprops_are_read_before_an_in_place_operation_after_the_layer():
    """An in-place ReLU after a layer rewrites its output tensor; the backprop recorded is still
    d loss / d (the layer's output), so the Kronecker gradients equal the generic path's and
    K-FAC's factors those of the same network without in-place operations."""
    plain, inplace = inplace_pair()
    x, y = torch.randn(9, 2, 4, 4, dtype=F64), torch.randint(0, 3, (9,))
    subspace = Kronecker(inplace, 12, seed=0)
    got = subspace.per_example_gradients(inplace, cross_entropy, x, y)
    expected = Subspace.per_example_gradients(subspace, plain, cross_entropy, x, y)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    curvature = KFAC(0.1, batch_size=5, progress=False)
    with_inplace = curvature.estimate(inplace, cross_entropy, subspace.layers, (x, y))
    without = curvature.estimate(plain, cross_entropy, subspace.layers, (x, y))
    for name, factors in without.items():
        assert factors.output.abs().max() > 1e-6
        torch.testing.assert_close(with_inplace[name].output, factors.output, atol=1e-12, rtol=0)
        torch.testing.assert_close(with_inplace[name].input, factors.input, atol=1e-12, rtol=0)


def test_backpropagate_stops_at_the_recorded_outputs():
    """No parameter gradient is accumulated, a call whose output does not reach the total gets
    no backprop, and a module called twice has two calls with their own backprops."""
    torch.manual_seed(4)
    shared, unused = nn.Linear(3, 3).double(), nn.Linear(3, 2).double()
    model = nn.ModuleDict({"shared": shared, "unused": unused})
    x = torch.randn(4, 3, dtype=F64)
    with record_calls(model, ["shared", "unused"]) as recording:
        first = shared(x)
        second = shared(torch.tanh(first))
        unused(x)
    total = (second**2).sum()
    expected_first = torch.autograd.grad(total, first, retain_graph=True)[0]
    backpropagate(total, recording)
    assert all(p.grad is None for p in model.parameters())
    assert recording["unused"][0].backprop is None
    assert [call.activation.shape for call in recording["shared"]] == [(4, 3), (4, 3)]
    torch.testing.assert_close(recording["shared"][1].backprop, 2 * second.detach())
    torch.testing.assert_close(recording["shared"][0].backprop, expected_first)


def test_free_cores_leaves_the_cores_other_threads_use(monkeypatch):
    """cpus - (runnable threads machine-wide - this process's), within [1, limit]."""
    assert threads_module.cores_left(cpus=2, others=0, limit=2) == 2
    assert threads_module.cores_left(cpus=2, others=1, limit=2) == 1
    assert threads_module.cores_left(cpus=2, others=5, limit=2) == 1
    assert threads_module.cores_left(cpus=8, others=3, limit=4) == 4
    assert threads_module.cores_left(cpus=8, others=-1, limit=16) == 8
    monkeypatch.setattr(threads_module, "_running_threads", lambda: 3)
    monkeypatch.setattr(threads_module, "_running_threads_of_this_process", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert free_cores(limit=3) == 1

    def missing() -> int:
        raise FileNotFoundError("/proc/loadavg")

    monkeypatch.setattr(threads_module, "_running_threads", missing)
    assert free_cores(limit=3) == 3


def test_shared_machine_threads_sets_and_restores_torch_threads(monkeypatch):
    previous = torch.get_num_threads()
    monkeypatch.setattr(threads_module, "free_cores", lambda limit: 1)
    torch.set_num_threads(2)
    try:
        with shared_machine_threads() as threads:
            assert threads == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setenv(threads_module.ADAPTIVE_VARIABLE, "0")
        with shared_machine_threads() as threads:
            assert threads == torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="reads Linux /proc")
def test_free_cores_sees_busy_processes():
    """With two busy loops running, at most cpus - 2 cores are free (at least 1)."""
    cpus = len(os.sched_getaffinity(0))
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert free_cores(limit=cpus) <= max(1, cpus - 2)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
