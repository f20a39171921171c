"""utils/inference.py: `auto` follows the measured decode speed (bf16 only past the margin, never where bf16 is
emulated), the measurement leaves the fp32 weights as they were, bf16 weights give the bf16 model's own logits,
and quantized weights stay in fp32."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import randomize_, save_tiny_start, tiny_config
from model import ByteModel
from utils import inference
from utils.errors import InputError


def tiny_model() -> ByteModel:
    torch.manual_seed(0)
    language_model = ByteModel(tiny_config())
    randomize_(language_model)
    return language_model.eval()


@pytest.mark.parametrize("speedup, expected", [(1.5, torch.bfloat16), (1.05, torch.float32), (0.7, torch.float32)])
def test_auto_takes_bf16_only_where_it_measures_clearly_faster(speedup, expected, monkeypatch):
    seen = []
    monkeypatch.setattr(inference, "native_bf16", lambda device: True)
    monkeypatch.setattr(inference, "bf16_speedup", lambda model, batch_size: seen.append(batch_size) or speedup)
    assert inference.decode_dtype(tiny_model(), "auto", batch_size=16) == expected
    assert seen == [16]  # measured at the batch size asked for


def test_auto_is_fp32_without_timing_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(inference, "native_bf16", lambda device: False)
    monkeypatch.setattr(inference, "bf16_speedup", lambda *args: pytest.fail("timed where bf16 is emulated"))
    assert inference.decode_dtype(tiny_model(), "auto") == torch.float32


@pytest.mark.parametrize("precision, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_an_explicit_precision_is_taken_without_timing(precision, expected, monkeypatch):
    monkeypatch.setattr(inference, "bf16_speedup", lambda *args: pytest.fail("timed an explicit precision"))
    assert inference.for_generation(tiny_model(), "m", precision=precision).dtype == expected


def test_the_timing_decodes_both_precisions_and_leaves_the_fp32_weights(monkeypatch):
    language_model = tiny_model()
    before = {name: weight.clone() for name, weight in language_model.state_dict().items()}
    dtypes = []
    measured = inference.decode_seconds
    monkeypatch.setattr(inference, "decode_seconds", lambda model, batch_size: dtypes.append(model.dtype)
                        or measured(model, batch_size))
    speedup = inference.bf16_speedup(language_model, batch_size=2, rounds=2)
    assert 0 < speedup < float("inf")
    # a warm-up and two rounds, alternating
    assert dtypes == [torch.float32, torch.bfloat16] * 3
    assert language_model.dtype == torch.float32
    assert all(torch.equal(before[name], weight) for name, weight in language_model.state_dict().items())


def test_bf16_weights_give_the_cast_models_logits():
    language_model = tiny_model()
    reference = tiny_model().to(torch.bfloat16)
    cast = inference.for_generation(language_model, "m", precision="bf16")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(cast(ids).logits, reference(ids).logits, rtol=0, atol=0)
        assert cast(ids).logits.dtype == torch.bfloat16


def test_quantized_weights_compute_in_fp32(monkeypatch):
    monkeypatch.setattr(inference, "bf16_speedup", lambda *args: pytest.fail("timed a quantized model"))
    monkeypatch.setattr(inference, "native_bf16", lambda device: True)
    quantized = inference.for_generation(tiny_model(), "m", quantize_mode="int8", precision="auto")
    assert quantized.config.quantization == "int8" and quantized.model.norm.weight.dtype == torch.float32
    with pytest.raises(InputError, match="--precision bf16 with --quantize"):
        inference.for_generation(tiny_model(), "m", quantize_mode="int8", precision="bf16")
    with pytest.raises(InputError, match="--precision must be one of"):
        inference.for_generation(tiny_model(), "m", precision="fp16")


def test_load_gives_a_folder_ready_to_generate(tmp_path):
    folder = save_tiny_start(tmp_path / "model")
    language_model, tokenizer = inference.load(str(folder), precision="bf16")
    original = AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16)
    assert language_model.dtype == torch.bfloat16 and not language_model.training
    assert tokenizer.chat_template
    assert all(torch.equal(a, b) for a, b in zip(language_model.state_dict().values(),
                                                 original.state_dict().values()))
