import torch

from potstill.encoder_inputs import ENCODER_INPUTS, encoder_inputs, encoder_inputs_on


def test_keeps_only_what_an_encoder_takes_in_the_batch_order():
    batch = {"offset_mapping": 1, "token_type_ids": 2, "labels": 3, "input_ids": 4, "attention_mask": 5}
    assert list(encoder_inputs(batch)) == ["token_type_ids", "input_ids", "attention_mask"]
    assert set(ENCODER_INPUTS) == {"input_ids", "attention_mask", "token_type_ids"}


def test_extra_names_and_device_move():
    batch = {"input_ids": torch.ones(1, 2, dtype=torch.long), "special_tokens_mask": torch.zeros(1, 2)}
    assert list(encoder_inputs(batch, extra=("special_tokens_mask",))) == ["input_ids", "special_tokens_mask"]
    moved = encoder_inputs_on(batch, "cpu")
    assert list(moved) == ["input_ids"] and moved["input_ids"].device.type == "cpu"
