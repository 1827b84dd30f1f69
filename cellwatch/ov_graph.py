"""Rewrites of the converted network that OpenVINO's CPU plugin runs faster, with the same
arithmetic.

Converted from Keras, the U-Net's graph has two steps that OpenVINO runs slowly on a CPU
(its per-layer counters, one 1,456² tile at bf16 on 2 cores,
``benchmarks/network_layers.py``): the last layer's softmax is taken over the channels
*after* the transpose to channels-last, three values per pixel that the CPU cannot
compute side by side (26 ms); and each skip connection is a channel concatenation that is
copied by a reference kernel (25 ms in all), because the skip's activations also feed a
pooling layer. Together a tenth of the network's time, for no arithmetic. :func:`faster`
rewrites them:

- the softmax is taken over the channel axis before the transpose (the same numbers:
  ``softmax(transpose(x), -1) == transpose(softmax(x, 1))``);
- a convolution of a concatenation becomes the sum of one convolution per part, with its
  share of the kernel (``conv([a, b], [Wa, Wb]) == conv(a, Wa) + conv(b, Wb)``); the
  sum is fused into the second convolution. The multiplications are the same; at bf16 the
  first part's sum is rounded to bf16 once more, which moves a few pixels' probabilities
  at the third decimal (measured on ``val``: docs/speed.md).

Only these exact patterns are rewritten; anything else in a graph is left as it is, so a
model of another shape (or an int8 graph, whose quantizers sit between the layers) runs
unchanged.
"""

from __future__ import annotations

__all__ = ["faster"]

from typing import Any

import numpy as np

CHANNELS_LAST = [0, 2, 3, 1]


def faster(model: Any, ops: Any) -> list[str]:
    """Rewrite ``model`` (an ``openvino.Model``) in place, with the operations of ``ops``
    (an OpenVINO opset module, ``openvino.opset13``: OpenVINO is imported by
    :mod:`cellwatch.runtime` only); returns what was rewritten, for the log:
    ``["softmax before transpose", "2 concatenations into convolutions"]``."""
    done = []
    if _softmax_before_transpose(model, ops):
        done.append("softmax before transpose")
    if split := _split_concatenated_convolutions(model, ops):
        done.append(f"{split} concatenations into convolutions")
    if done:
        model.validate_nodes_and_infer_types()
    return done


def _consumers(node: Any) -> list[Any]:
    return [target.get_node() for target in node.output(0).get_target_inputs()]


def _constant(node: Any) -> np.ndarray | None:
    return node.get_data() if node.get_type_name() == "Constant" else None


def _softmax_before_transpose(model: Any, ops: Any) -> bool:
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Softmax":
            continue
        transpose = node.input_value(0).get_node()
        if transpose.get_type_name() != "Transpose" or len(_consumers(transpose)) != 1:
            continue
        order = _constant(transpose.input_value(1).get_node())
        rank = node.get_output_partial_shape(0).rank
        axis = int(node.get_attributes()["axis"])
        if order is None or list(order) != CHANNELS_LAST or axis not in (3, -1):
            continue
        if not (rank.is_static and rank.get_length() == 4):
            continue
        softmax = ops.softmax(transpose.input_value(0), 1)
        node.output(0).replace(ops.transpose(softmax, transpose.input_value(1)).output(0))
        return True
    return False


def _split_concatenated_convolutions(model: Any, ops: Any) -> int:
    split = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Concat" or int(node.get_attributes()["axis"]) != 1:
            continue
        consumers = _consumers(node)
        if len(consumers) != 1 or consumers[0].get_type_name() != "Convolution":
            continue
        conv = consumers[0]
        kernel = _constant(conv.input_value(1).get_node())
        parts = [node.input_value(i) for i in range(node.get_input_size())]
        widths = [part.get_partial_shape()[1] for part in parts]
        if kernel is None or not all(width.is_static for width in widths):
            continue
        bounds = np.cumsum([0, *(width.get_length() for width in widths)])
        if bounds[-1] != kernel.shape[1]:
            continue
        attrs = conv.get_attributes()
        total = None
        for part, start, stop in zip(parts, bounds[:-1], bounds[1:], strict=True):
            share = ops.constant(np.ascontiguousarray(kernel[:, start:stop]))
            out = ops.convolution(
                part,
                share,
                attrs["strides"],
                attrs["pads_begin"],
                attrs["pads_end"],
                attrs["dilations"],
                attrs["auto_pad"],
            )
            total = out if total is None else ops.add(total, out)
        conv.output(0).replace(total.output(0))
        split += 1
    return split
