"""The network's graph rewritten for OpenVINO's CPU plugin: the same numbers, without the
slow softmax and the copied concatenations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import load_with

from cellwatch import ov_graph
from cellwatch.runtime import _openvino

ov = _openvino()  # as cellwatch imports it: without OpenVINO's usage reports (their threads)
ops = ov.opset13


def conv(x: Any, channels_in: int, channels_out: int, seed: int) -> Any:
    kernel = np.random.default_rng(seed).normal(size=(channels_out, channels_in, 3, 3))
    return ops.convolution(
        x, ops.constant(kernel.astype(np.float32)), [1, 1], [1, 1], [1, 1], [1, 1]
    )


def unet_like(*, skip_axis: int = 1, softmax_axis: int = -1, pooled_concat: bool = False) -> Any:
    """A skip connection that is also pooled, concatenated with another branch, convolved,
    turned channels-last and soft-maxed: the shape of the converted U-Net's layers."""
    x = ops.parameter([1, 2, 16, 16], np.float32, name="x")
    skip = ops.relu(conv(x, 2, 4, 0))
    pooled = ops.max_pool(skip, [2, 2], [1, 1], [0, 0], [0, 0], [2, 2])
    other = conv(x, 2, 4, 1)
    joined = ops.concat([other, skip], skip_axis)
    width = 8 if skip_axis == 1 else 4
    out = conv(joined, width, 3, 2)
    probabilities = ops.softmax(
        ops.transpose(out, ops.constant(np.array([0, 2, 3, 1]))), softmax_axis
    )
    results = [probabilities, pooled] + ([ops.relu(joined)] if pooled_concat else [])
    return ov.Model(results, [x])


def run(model: Any, x: np.ndarray) -> list[np.ndarray]:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return [np.array(out) for out in request.infer({0: x}).values()]


def kinds(model: Any) -> list[str]:
    return [node.get_type_name() for node in model.get_ordered_ops()]


def test_the_rewritten_graph_gives_the_same_numbers_without_concat_or_late_softmax():
    x = np.random.default_rng(3).normal(size=(1, 2, 16, 16)).astype(np.float32)
    before = run(unet_like(), x)
    model = unet_like()
    assert ov_graph.faster(model, ops) == [
        "softmax before transpose",
        "1 concatenations into convolutions",
    ]
    assert "Concat" not in kinds(model)
    softmax = next(n for n in model.get_ordered_ops() if n.get_type_name() == "Softmax")
    assert softmax.get_attributes()["axis"] == 1  # over the channels, before the transpose
    assert softmax.input_value(0).get_node().get_type_name() == "Add"  # the two parts' sum
    after = run(model, x)
    assert after[0].shape == (1, 16, 16, 3)
    np.testing.assert_allclose(after[0], before[0], atol=1e-5)
    np.testing.assert_array_equal(after[1], before[1])


@pytest.mark.parametrize(
    "shape",
    [
        {"skip_axis": 2, "softmax_axis": 1},  # joined along rows; softmax over rows
        {"pooled_concat": True, "softmax_axis": 1},  # the concatenation is used twice
    ],
)
def test_anything_but_the_exact_patterns_is_left_alone(shape):
    model = unet_like(**shape)
    before = kinds(model)
    assert ov_graph.faster(model, ops) == []
    assert kinds(model) == before


@pytest.fixture(scope="module")
def bundled_bf16() -> Any:
    return load_with(None, "openvino", "bf16")  # converting it starts TensorFlow's threads


def test_the_bundled_network_runs_rewritten(bundled_bf16):
    """What the CPU runs for the bundled U-Net has no concatenation left, and the softmax
    comes before the transpose: the rewrite is applied where the model is compiled."""
    runtime = bundled_bf16.network.get_runtime_model()
    layers = [node.get_rt_info()["layerType"].astype(str) for node in runtime.get_ordered_ops()]
    assert "Concat" not in layers
    assert layers.count("Convolution") > 20
    softmax = next(
        n
        for n in runtime.get_ordered_ops()
        if n.get_rt_info()["layerType"].astype(str) == "Softmax"
    )
    following = [
        t.get_node().get_rt_info()["layerType"].astype(str)
        for t in softmax.output(0).get_target_inputs()
    ]
    assert following in (["Transpose"], ["Reorder"])
