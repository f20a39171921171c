"""Which precision and whether to compile: decided once per run from the config and the hardware."""

import contextlib

import torch
from torch import nn

from model import moe_layers
from utils.errors import InputError
from utils.lora import is_peft_model


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (CUDA with bf16, or a CPU with AVX-512 BF16): elsewhere bf16 is emulated
    and far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """`auto` picks bf16 only where the hardware runs it natively (`native_bf16`). fp16 on a CPU is never worth
    it."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise InputError("train.precision=fp16 is very slow on a CPU; use bf16 (native on AVX-512 BF16) or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward passes; fp32 runs without autocast."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def resolve_compile(setting: bool | str, device: torch.device, dtype: torch.dtype, model: nn.Module) -> bool:
    """`auto` compiles where scripts/benchmark.py measured it paying for its compile time: with bf16 autocast or on
    CUDA; not in fp32 on a CPU (a small gain that a demo-length run loses to the compile), and not for MoE models
    (data-dependent expert dispatch) or LoRA."""
    if isinstance(setting, bool):
        return setting
    return (device.type == "cuda" or dtype == torch.bfloat16) and not moe_layers(model) and not is_peft_model(model)
