"""Weight quantization of a loaded model for inference: `quantize(model, "int8" | "int4")`.

int8: every linear layer gets symmetric int8 weights with one scale per output channel and runs on fbgemm's int8
GEMM (torch's quantized CPU backend), which quantizes each call's activations to 7 bits as it goes ("dynamic"
quantization). int4: asymmetric 4-bit weights in groups of `group_size` inputs, expanded to fp32 for each matrix
multiply (torch's packed int4 CPU kernel is faster for one token but tens of times slower for several). The token
embedding is stored the same way (only looked-up rows are expanded), so weights in memory shrink about 3.5-4x and
6-7x. These are the fastest weight-quantized CPU kernels this torch offers; README's benchmark section has the
measurements, torchao's CPU paths among them.

Quantized layers compute in fp32 on the CPU. Mixture-of-experts models are refused: their experts are batched 3D
weights that no int8/int4 CPU kernel here multiplies.
"""

import itertools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE_CHOICES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)
_KEYS = itertools.count()


# fbgemm's packed weights are a TorchScript object that torch.compile cannot trace; behind a custom op, looked up by
# a key, the compiled decode step (a static cache) keeps each int8 GEMM as one opaque call with no graph break. The op
# is defined with torch.library.Library rather than the custom_op decorator: its CPU kernel is then called straight
# from the dispatcher, without the decorator's autograd and dispatch wrappers in Python (10 us of the 34 us a call of
# a 512 x 512 layer took at batch 1; the GEMM itself is 19 us). Inference only: it has no backward.
_INT8_LAYERS: dict[int, weakref.ref] = {}
_LIBRARY = torch.library.Library("stellarbyte", "DEF")
_LIBRARY.define("int8_linear(Tensor x, int key, int out_features) -> Tensor")


def _int8_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    # reduce_range: 7-bit activations, so that AVX2's 16-bit multiply-add cannot saturate.
    return torch.ops.quantized.linear_dynamic(x, _INT8_LAYERS[key]().packed, True)


_LIBRARY.impl("int8_linear", _int8_linear, "CPU")


@torch.library.register_fake("stellarbyte::int8_linear")
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


int8_linear = torch.ops.stellarbyte.int8_linear


class Int8Linear(nn.Module):
    """`nn.Linear` with per-output-channel symmetric int8 weights on fbgemm's dynamic int8 GEMM. Activations are
    quantized with one scale per call, so a row's result depends slightly on the rows it shares the call with."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():
            # quantized tensors exist here only as the input fbgemm's packing function takes
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            qweight = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.nbytes = weight.numel() + 4 * scale.numel() + (0 if bias is None else 4 * bias.numel())
        self.key = next(_KEYS)
        _INT8_LAYERS[self.key] = weakref.ref(self, lambda _, key=self.key: _INT8_LAYERS.pop(key, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        # Eager calls skip the custom op's Python dispatch, which costs about as much as a small layer's GEMM.
        out = (int8_linear(rows, self.key, self.out_features) if torch.compiler.is_compiling()
               else torch.ops.quantized.linear_dynamic(rows, self.packed, True))
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int4_pack(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group of `group_size` inputs, two to a byte, with each group's scale and minimum:
    weight ~ code * scale + minimum."""
    groups = weight.float().reshape(weight.shape[0], -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).flatten(1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale, low


def int4_unpack(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """fp32 rows from `int4_pack`'s codes (any leading dimensions, as gathered rows have)."""
    values = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).unflatten(-1, (scale.shape[-1], -1))
    return torch.addcmul(low[..., None], values.float(), scale[..., None]).flatten(-2)


def int4_group_size(in_features: int, group_size: int | None) -> int:
    """`group_size` if given, else the largest of 128, 64, 32 that divides `in_features`."""
    sizes = (group_size,) if group_size else INT4_GROUP_SIZES
    for size in sizes:
        if in_features % size == 0:
            return size
    raise ValueError(f"int4 needs input sizes divisible by {' or '.join(map(str, sizes))}; a layer has "
                     f"{in_features}")


class Int4Linear(nn.Module):
    """`nn.Linear` with grouped asymmetric 4-bit weights, expanded to fp32 for each call's matrix multiply."""

    def __init__(self, linear: nn.Linear, group_size: int | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = int4_group_size(self.in_features, group_size)
        codes, scale, low = int4_pack(linear.weight.detach(), self.group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = int4_unpack(self.codes, self.scale, self.low)
        return F.linear(x.float(), weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group {self.group_size}"


class QuantizedEmbedding(nn.Module):
    """An embedding table stored like the linear layers (int8 rows with one scale each, or `int4_pack`'s groups);
    only the looked-up rows are expanded to fp32."""

    def __init__(self, embedding: nn.Embedding, bits: int, group_size: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self.bits = bits
        weight = embedding.weight.detach().float()
        if bits == 8:
            scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
            codes, low = (weight / scale[:, None]).round().to(torch.int8), None
        else:
            codes, scale, low = int4_pack(weight, int4_group_size(self.embedding_dim, group_size))
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return self.codes[input_ids].float() * self.scale[input_ids, None]
        return int4_unpack(self.codes[input_ids], self.scale[input_ids], self.low[input_ids])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}"


def check_quantizable(model: nn.Module, mode: str, group_size: int | None = None) -> None:
    """Raise ValueError (one line) where `quantize(model, mode, group_size)` cannot apply, before anything
    changes."""
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {mode!r}")
    if mode == "none":
        return
    if getattr(model.config, "num_experts", 0):
        raise ValueError(f"{mode} quantization supports dense models only: a mixture of experts keeps its experts "
                         "in batched 3D weights that no int8/int4 CPU kernel here multiplies")
    if any(parameter.device.type != "cpu" for parameter in model.parameters()):
        raise ValueError(f"{mode} quantization runs on the CPU only (fbgemm's int8 GEMM is a CPU kernel)")
    if mode == "int4":
        for module in model.modules():
            if type(module) in (nn.Linear, nn.Embedding):
                int4_group_size(module.weight.shape[1], group_size)


def quantize(model: nn.Module, mode: str, group_size: int | None = None) -> nn.Module:
    """Replace `model`'s linear layers and token embedding with quantized ones, in place, and return it in eval
    mode. `mode` is "none" (unchanged), "int8" or "int4"; `group_size` fixes int4's group (default: the largest of
    128, 64, 32 dividing each layer's input). For inference only: the quantized weights take no gradients."""
    check_quantizable(model, mode, group_size)
    if mode == "none":
        return model
    model.eval()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child) if mode == "int8" else Int4Linear(child, group_size))
            elif type(child) is nn.Embedding:
                setattr(parent, name, QuantizedEmbedding(child, 8 if mode == "int8" else 4, group_size))
    if tied and mode == "int4":
        # One table serves both, as the fp32 weight did: the embedding gathers rows of the head's codes.
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        embedding.codes, embedding.scale, embedding.low = head.codes, head.scale, head.low
    # int8 keeps two copies of a tied table: fbgemm's packed head cannot be gathered from.
    model.config.tie_word_embeddings = tied and mode == "int4"
    model.config.quantization = mode
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take in memory: parameters and the quantized layers' codes and scales, each
    tensor once however many modules share it, plus fbgemm's packed int8 weights."""
    tensors = {tensor.data_ptr(): tensor.numel() * tensor.element_size()
               for module in model.modules()
               for tensor in (*module.parameters(recurse=False),
                              *(module.buffers(recurse=False) if isinstance(module, (Int4Linear, QuantizedEmbedding))
                                else ()))}
    return sum(tensors.values()) + sum(module.nbytes for module in model.modules() if isinstance(module, Int8Linear))
