"""AutoDistil's weight-sharing supernet (`potstill.students.supernet`): subnets are slices of its weights, run
through them, and train them."""

from __future__ import annotations

import math
import random

import pytest
import torch

from potstill.errors import UserError
from potstill.students.build import spread_layers
from potstill.students.supernet import ElasticBert, ElasticSpace, Subnet, last_layer_qkv, relation_mse

SPACE = ElasticSpace(layers=(1, 2, 4), hidden=(32, 64), ffn=(64, 128))


@pytest.fixture(scope="module")
def elastic():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=32), add_pooling_layer=False)
    return ElasticBert(model.eval(), SPACE).eval()


def _inputs():
    ids = torch.tensor([[5, 7, 9, 11, 3, 0], [4, 8, 12, 2, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_the_largest_subnet_is_the_supernet(elastic):
    got = elastic(SPACE.largest(), **_inputs()).last_hidden_state
    torch.testing.assert_close(got, elastic.supernet(**_inputs()).last_hidden_state, rtol=0, atol=0)


def test_an_extracted_subnet_holds_slices_of_the_supernet_and_computes_the_same(elastic):
    subnet = Subnet(layers=2, hidden=32, ffn=64)
    small = elastic.extract(subnet)
    assert (small.config.hidden_size, small.config.num_attention_heads, small.config.num_hidden_layers,
            small.config.intermediate_size) == (32, 2, 2, 64)
    big = elastic.supernet
    assert spread_layers(2, 4) == [0, 3]
    torch.testing.assert_close(small.encoder.layer[1].intermediate.dense.weight,
                               big.encoder.layer[3].intermediate.dense.weight[:64, :32], rtol=0, atol=0)
    torch.testing.assert_close(small.encoder.layer[1].output.dense.weight,
                               big.encoder.layer[3].output.dense.weight[:32, :64], rtol=0, atol=0)
    torch.testing.assert_close(small.encoder.layer[0].attention.self.query.weight,
                               big.encoder.layer[0].attention.self.query.weight[:32, :32], rtol=0, atol=0)
    torch.testing.assert_close(small.embeddings.word_embeddings.weight,
                               big.embeddings.word_embeddings.weight[:, :32], rtol=0, atol=0)
    torch.testing.assert_close(small.embeddings.LayerNorm.bias, big.embeddings.LayerNorm.bias[:32], rtol=0, atol=0)
    torch.testing.assert_close(elastic(subnet, **_inputs()).last_hidden_state,
                               small.eval()(**_inputs()).last_hidden_state, rtol=1e-6, atol=1e-6)


def test_a_subnets_gradient_lands_in_its_slice_of_the_shared_weights(elastic):
    subnet = Subnet(layers=1, hidden=32, ffn=64)
    elastic.zero_grad()
    elastic(subnet, **_inputs()).last_hidden_state.pow(2).sum().backward()
    ffn = elastic.supernet.encoder.layer[0].intermediate.dense.weight.grad
    assert ffn[:64, :32].abs().sum() > 0 and ffn[64:].abs().sum() == 0 and ffn[:, 32:].abs().sum() == 0
    assert elastic.supernet.encoder.layer[1].intermediate.dense.weight.grad is None  # a layer it does not use
    elastic.zero_grad()


def test_the_sandwich_sample_and_the_space():
    drawn = SPACE.sample(random.Random(0), n_random=2)
    assert drawn[0] == Subnet(4, 64, 128) and drawn[1] == Subnet(1, 32, 64) and len(drawn) == 4
    assert all(d.layers in SPACE.layers and d.hidden in SPACE.hidden and d.ffn in SPACE.ffn for d in drawn[2:])
    assert len(SPACE.all()) == 12 and Subnet(2, 32, 64).label == "2L-h32-ffn64"


@pytest.mark.parametrize("space, message", [
    (ElasticSpace((5,), (64,), (128,)), "depth 5"),
    (ElasticSpace((2,), (40,), (128,)), "multiple of the head size 16"),
    (ElasticSpace((2,), (64,), (256,)), "FFN width 256"),
])
def test_a_subnet_outside_the_supernet_is_one_line(elastic, space, message):
    with pytest.raises(UserError, match=message) as err:
        ElasticBert(elastic.supernet, space)
    assert "\n" not in str(err.value)


def test_relation_mse_by_hand():
    """One relation head, 2 real tokens and a padded one: R = x xᵀ/√d; MSE over the 4 real pairs, summed over
    q, k, v."""
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # R_s = [[1, 0], [0, 1]] / √2, R_t = [[1, 1], [1, 1]] / √2 on the real pairs: squared diffs 0, 1/2, 1/2, 0
    want = 3 * (0 + 0.5 + 0.5 + 0) / 4
    assert relation_mse([s, s, s], [t, t, t], mask, heads=1).item() == pytest.approx(want)
    assert relation_mse([s], [s], mask, heads=1).item() == 0.0
    assert math.isfinite(relation_mse([s], [t], torch.ones(1, 3, dtype=torch.long), heads=2).item())


def test_last_layer_qkv_records_the_projections(elastic):
    subnet = Subnet(layers=2, hidden=32, ffn=64)
    with last_layer_qkv(elastic._module(subnet)) as qkv:
        elastic(subnet, **_inputs())
    assert {k: tuple(v.shape) for k, v in qkv.items()} == {"query": (2, 6, 32), "key": (2, 6, 32),
                                                           "value": (2, 6, 32)}
