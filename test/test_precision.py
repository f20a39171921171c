"""utils/precision.py: bf16 only where the hardware runs it natively; compile where it pays."""

import pytest
import torch

from helpers import tiny_config
from model import ByteModel
from utils.errors import InputError
from utils.precision import autocast, resolve_compile, resolve_precision


# --------------------------------------------------------------------------------------------------------- 1. set-up

def test_resolve_precision_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16


def test_resolve_precision_rejects_fp16_on_cpu():
    with pytest.raises(InputError, match="train.precision=fp16 is very slow on a CPU"):
        resolve_precision("fp16", torch.device("cpu"))


def test_resolve_compile_auto_compiles_where_it_pays():
    dense, moe = ByteModel(tiny_config()), ByteModel(tiny_config(num_experts=4))
    cpu = torch.device("cpu")
    assert resolve_compile("auto", cpu, torch.bfloat16, dense) is True
    assert resolve_compile("auto", cpu, torch.float32, dense) is False
    assert resolve_compile("auto", torch.device("cuda"), torch.float32, dense) is True
    assert resolve_compile("auto", cpu, torch.bfloat16, moe) is False
    assert resolve_compile(True, cpu, torch.float32, moe) is True and resolve_compile(False, cpu, torch.bfloat16,
                                                                                      dense) is False


def test_autocast_only_below_fp32():
    cpu = torch.device("cpu")
    with autocast(cpu, torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
