"""What differs between the supported transformers versions (``csp_inductor.compat``), on
whichever is installed (``make test`` runs the newest, ``make test-compat`` 5.2)."""

import torch

import csp_inductor
from csp_inductor import compat
from csp_inductor.testing import known_model_types, tiny_family_model


def test_a_cache_with_layers_that_store_nothing_resets():
    model = tiny_family_model(known_model_types("gemma4", "gemma3n_text")[0])
    csp_inductor.compile(model, csp_inductor.Full(), compile=False)
    cache = model.csp_backend.new_cache()
    assert any(isinstance(layer, compat.DummyLayer) for layer in cache.layers)
    cache.reset()


def test_mask_calls_of_either_convention():
    new = compat.mask_call({}, 5, 3, "cpu", True)
    assert new == (5, 3, "cpu", True)
    at = torch.arange(3, 8)
    causal = compat.mask_call({"cache_position": at, "use_vmap": False}, None, 0, "cpu", False)
    assert (causal[0], int(causal[1]), causal[3]) == (5, 3, True)
    overlay = compat.mask_call({"cache_position": at, "use_vmap": True}, None, 0, "cpu", False)
    bidirectional = compat.mask_call(
        {"cache_position": at, "use_vmap": False, "allow_is_bidirectional_skip": False},
        None, 0, "cpu", False,
    )  # fmt: skip
    assert overlay[3] is False and bidirectional[3] is False
