"""The context a network needs: its pooling grid and its effective receptive field, measured
once and recorded in the model card."""

from __future__ import annotations

import numpy as np
import pytest

from cellwatch import model as model_module
from cellwatch.config import Config, override
from cellwatch.errors import ConfigError
from cellwatch.model import (
    BUNDLED_MODEL,
    build_seed_unet,
    build_unet,
    load_model,
    measure_receptive_field,
    pooling_grid,
    read_card,
    write_card,
)
from cellwatch.pipeline import Segmenter


def conv_stack(*kernels: int, pool: bool = False):
    """Convolutions of the given sizes ('same' padding, averaging kernels), sigmoid out;
    with ``pool``, a 2× max-pooling and upsampling between the first two."""
    import keras
    from keras import layers

    inputs = keras.Input((None, None, 1))
    x = inputs
    for i, k in enumerate(kernels):
        conv = layers.Conv2D(1, k, padding="same")
        x = conv(x)
        conv.set_weights([np.full((k, k, 1, 1), 4.0 / k**2, np.float32), np.array([-1.0])])
        if pool and i == 0:
            x = layers.UpSampling2D(2)(layers.MaxPooling2D(2)(x))
    return keras.Model(inputs, layers.Activation("sigmoid")(x))


def test_pooling_grid_is_the_product_of_downsampling_strides():
    assert pooling_grid(build_unet(depth=2, filters=2)) == 4
    assert pooling_grid(build_unet(depth=4, filters=2)) == 16
    assert pooling_grid(build_seed_unet(filters=2)) == 256  # eight stride-2 convolutions
    assert pooling_grid(conv_stack(3, 3)) == 1
    assert pooling_grid(conv_stack(3, 3, pool=True)) == 2


@pytest.mark.parametrize(("kernels", "radius"), [((1,), 0), ((5,), 2), ((3, 3), 2), ((3, 5), 3)])
def test_measured_radius_of_plain_convolutions_is_their_reach(kernels, radius):
    measured = measure_receptive_field(conv_stack(*kernels))
    assert measured is not None
    assert measured["radius_px"] == radius
    assert measured["grid_px"] == 1 and measured["tolerance"] == 1e-3


def test_pooling_widens_the_field_within_its_theoretical_reach():
    # 3×3 conv (1 px), 2× pooling (up to 1 px more), 3×3 conv at full resolution (1 px)
    measured = measure_receptive_field(conv_stack(3, 3, pool=True))
    assert measured is not None and 2 <= measured["radius_px"] <= 4
    assert measured["grid_px"] == 2


def test_a_network_of_fixed_input_size_has_no_measurable_field():
    assert measure_receptive_field(build_seed_unet(filters=2)) is None


def test_the_bundled_card_records_what_is_measured():
    card = read_card(BUNDLED_MODEL)["receptive_field"]
    model = load_model()
    assert model.grid_px == card["grid_px"] == 16
    measured = measure_receptive_field(model.network, diameter_px=model.diameter_px)
    assert measured == card
    # the U-Net's theoretical reach is under 6 × 16 px; 1e-3 is reached a little before it
    assert 80 <= card["radius_px"] < 96


def test_context_is_read_from_the_card_or_measured_once(tmp_path, monkeypatch):
    path = tmp_path / "conv.keras"
    conv_stack(5).save(path)
    write_card(path, {"name": "conv"})
    calls = []
    real = model_module.measure_receptive_field

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "measure_receptive_field", counting)
    loaded = load_model(path)
    assert loaded.context_px == 2 and loaded.context_px == 2
    assert len(calls) == 1  # cached in memory
    write_card(path, {"name": "conv", "receptive_field": {"radius_px": 7}})
    assert load_model(path).context_px == 7
    assert len(calls) == 1  # the card's figure is used as it is


def test_segmenter_tiles_to_cover_the_field(tmp_path):
    path = tmp_path / "conv.keras"
    conv_stack(3, 3, pool=True).save(path)
    model = load_model(path)
    seg = Segmenter(override(Config(), **{"tiling.tile_size": 64}), model)
    assert seg.tiling.align == 2 and seg.tiling.margin >= model.context_px
    fixed = Segmenter(override(Config(), **{"tiling.tile_size": 64, "tiling.overlap": 10}), model)
    assert (fixed.tiling.tile, fixed.tiling.overlap, fixed.tiling.align) == (64, 10, 2)


def test_tiles_too_small_for_the_model_are_a_config_error():
    with pytest.raises(ConfigError, match=r"tiling: tiles of 192 px are too small .* 208 px"):
        Segmenter(override(Config(), **{"tiling.tile_size": 192}), load_model())


def test_a_network_of_fixed_input_size_gets_tiles_of_that_size(tmp_path):
    path = tmp_path / "seed.keras"
    build_seed_unet(filters=2).save(path)
    seg = Segmenter(Config(), load_model(path))
    assert (seg.tiling.tile, seg.tiling.align) == (256, 1)  # it pools down to one pixel
    labels = seg.segment(np.zeros((300, 200), np.uint8)).labels
    assert labels.shape == (300, 200)
