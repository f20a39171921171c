"""Export a saved ByteModel as one GGUF file for llama.cpp and the programs built on it (ollama, LM Studio):
`python scripts/export_gguf.py --model DIR --out FILE [--dtype f32|f16|bf16|q8_0] [--tokenizer DIR] [--force]`.

The model goes in as llama.cpp's Llama architecture (a mixture of experts as its Mixtral layout: Llama with expert
tensors), written by the `gguf` package (llama.cpp's own writer, tensor names and q8_0 quantization). Norms and the
router stay f32, as llama.cpp's converter keeps them; everything else takes --dtype. The tokenizer goes in whole:
byte-level BPE vocabulary and merges, token types (special tokens as control tokens), bos/eos/pad ids, llama.cpp's
"gpt-2" pre-tokenizer (the GPT-2 split pattern ours uses, so llama.cpp splits any text into the same ids) and the
chat template. What scripts/export_hf.py refuses is refused here too, before anything is written; the file is
written beside --out and renamed into place.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts scripts/ first on the path (export_hf is found there); the repository root too.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import gguf  # noqa: E402
import torch  # noqa: E402
from transformers import PretrainedConfig, PreTrainedTokenizerBase  # noqa: E402

from export_hf import build_target, check_expressible, load_tokenizer, target_config_from  # noqa: E402
from utils.checkpoint import load_model_folder  # noqa: E402
from utils.errors import InputError, exit_on_input_error  # noqa: E402
from utils.logger import quiet_transformers  # noqa: E402

QUANT = gguf.GGMLQuantizationType
DTYPES = {"f32": (QUANT.F32, gguf.LlamaFileType.ALL_F32), "f16": (QUANT.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (QUANT.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (QUANT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
ARCH = gguf.MODEL_ARCH.LLAMA
# llama.cpp's name for the GPT-2 split pattern, which it applies before byte-level BPE.
PRE_TOKENIZER = "gpt-2"


def check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name the .gguf file to write")
    if out.exists() and not force:
        raise InputError(f"--out {out} exists; pass --force to replace it")


def check_tokenizer(folder: Path, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int) -> None:
    """Refuse a tokenizer that llama.cpp's gpt-2 pre-tokenizer with byte-level BPE would not reproduce."""
    if tokenizer is None:
        raise InputError(f"{folder} has no tokenizer.json, and a GGUF file needs one: export final/, or pass "
                         f"--tokenizer with the run's tokenizer folder")
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model, pre, normalizer = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    byte_level = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                  and not pre.get("add_prefix_space", False))
    if model.get("type") != "BPE" or model.get("byte_fallback") or normalizer is not None or not byte_level:
        raise InputError(f"the tokenizer in {folder} is not byte-level BPE with the GPT-2 split pattern (model "
                         f"{model.get('type')}, pre-tokenizer {pre.get('type')}, normalizer "
                         f"{(normalizer or {}).get('type')}): llama.cpp would split text differently")
    if len(tokenizer) > vocab_size:
        raise InputError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {vocab_size}")


def vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token (byte-level text, as in tokenizer.json) and llama.cpp token type; ids the tokenizer never
    produces (the model's vocab_size may be larger) are unused placeholders."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[index].special:
            # Control tokens are matched in text only when asked (special=True) and not printed when decoding,
            # as our tokenizer's special tokens.
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, types


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, the bos/eos/pad ids and the chat template, read from the tokenizer files by the gguf package.
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    # Whether bos/eos frame plain text is what our tokenizer does, not llama.cpp's default for the vocabulary type.
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)


def add_hyperparameters(writer: gguf.GGUFWriter, target: PretrainedConfig, file_type: gguf.LlamaFileType) -> None:
    """The fields llama.cpp's converter writes for a Llama or Mixtral config."""
    writer.add_name("StellarByte")
    writer.add_vocab_size(target.vocab_size)
    writer.add_context_length(target.max_position_embeddings)
    writer.add_embedding_length(target.hidden_size)
    writer.add_block_count(target.num_hidden_layers)
    writer.add_feed_forward_length(target.intermediate_size)
    writer.add_head_count(target.num_attention_heads)
    writer.add_head_count_kv(target.num_key_value_heads)
    writer.add_key_length(target.head_dim)
    writer.add_value_length(target.head_dim)
    writer.add_rope_dimension_count(target.head_dim)
    writer.add_rope_freq_base(target.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(target.rms_norm_eps)
    if target.model_type == "mixtral":
        writer.add_expert_count(target.num_local_experts)
        writer.add_expert_used_count(target.num_experts_per_tok)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows of a q/k projection so that llama.cpp's RoPE, which rotates adjacent pairs, rotates
    the same pairs as transformers' rotate_half, which pairs dimension i with i + head_dim / 2."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(target: PretrainedConfig, state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight of the Llama or Mixtral state dict, in llama.cpp's layout."""
    names = gguf.get_tensor_name_map(ARCH, target.num_hidden_layers)
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and target.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output is absent
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = rope_pairs(tensor, target.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = rope_pairs(tensor, target.num_key_value_heads)
        if name.endswith("experts.gate_up_proj"):
            # llama.cpp's Llama reads gate and up experts as two tensors; ours hold gate rows first, then up rows.
            gate, up = tensor.chunk(2, dim=1)
            pieces = [(name.replace("gate_up_proj", "gate_proj"), gate), (name.replace("gate_up_proj", "up_proj"), up)]
        else:
            pieces = [(name, tensor)]
        for piece, value in pieces:
            # Expert tensors are bare parameters; llama.cpp expects every weight name to end in ".weight".
            piece = piece if piece.endswith((".weight", ".bias")) else piece + ".weight"
            mapped = names.get_name(piece, try_suffixes=(".weight", ".bias"))
            if mapped is None:
                raise InputError(f"{name} has no place in llama.cpp's {ARCH.name.lower()} architecture")
            yield mapped, value


def tensor_type(name: str, tensor: torch.Tensor, dtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    # llama.cpp computes norms, biases and the router in f32 and expects them stored so, whatever the file type.
    if tensor.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return QUANT.F32
    return dtype


def add_tensors(writer: gguf.GGUFWriter, tensors: Iterator[tuple[str, torch.Tensor]],
                dtype: gguf.GGMLQuantizationType) -> list[str]:
    """Add every tensor in its type; returns the names kept in f16 because q8_0 needs rows of whole blocks."""
    kept_f16 = []
    for name, tensor in tensors:
        data, kind = tensor.detach().float().contiguous().numpy(), tensor_type(name, tensor, dtype)
        try:
            quantized = gguf.quants.quantize(data, kind)
        except gguf.QuantError:
            kind, quantized = QUANT.F16, gguf.quants.quantize(data, QUANT.F16)
            kept_f16.append(name)
        writer.add_tensor(name, quantized, raw_dtype=kind)
    return kept_f16


def write_file(writer: gguf.GGUFWriter, out: Path) -> None:
    """Write the file beside `out`, flush it to disk and rename it over `out`: never a half-written file there."""
    # The gguf writer opens its file by name, so the temporary name is handed to it.
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(path=temporary)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        temporary.replace(out)
    except OSError as error:  # an unwritable place or a full disk: the user's to fix, like any other bad input
        raise InputError(f"cannot write {out}: {error}") from None
    finally:
        temporary.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved ByteModel folder (final/, best/ or a checkpoint "
                                                       "step folder)")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f32", help="weight type of the file (default f32; norms "
                                                                       "and the router are always f32)")
    parser.add_argument("--tokenizer", help="folder of the tokenizer (default: --model's own)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    source, out = Path(args.model), Path(args.out)
    tokenizer_folder = Path(args.tokenizer) if args.tokenizer else source
    dtype, file_type = DTYPES[args.dtype]

    # Everything that can refuse runs before the first byte is written.
    check_out(out, args.force)
    model = load_model_folder(source)
    state_dict = model.state_dict()
    check_expressible(model.config, state_dict)
    target = target_config_from(model.config, torch.float32)
    # The Llama or Mixtral model holding these weights: refuses any parameter the target lacks, by name.
    exported = build_target(state_dict, target)
    tokenizer = load_tokenizer(tokenizer_folder) if tokenizer_folder.is_dir() else None
    check_tokenizer(tokenizer_folder, tokenizer, target.vocab_size)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[ARCH])
    add_hyperparameters(writer, target, file_type)
    add_tokenizer(writer, tokenizer_folder, tokenizer, target.vocab_size)
    kept_f16 = add_tensors(writer, gguf_tensors(target, exported.state_dict()), dtype)
    write_file(writer, out)

    if (model.config.rope_parameters or {}).get("rope_type") == "dynamic":
        print(f"note: GGUF has no dynamic NTK RoPE: llama.cpp applies plain RoPE, which is the same up to "
              f"max_position_embeddings={model.config.max_position_embeddings} tokens (the file's context length)")
    if kept_f16:
        print(f"note: {len(kept_f16)} tensors kept in f16: q8_0 needs rows that are a multiple of "
              f"{gguf.GGML_QUANT_SIZES[QUANT.Q8_0][0]} ({', '.join(kept_f16[:3])})")
    parameters = sum(tensor.numel() for tensor in exported.parameters())
    print(f"exported {source} -> {out}: {gguf.MODEL_ARCH_NAMES[ARCH]}"
          f"{' (mixture of experts)' if model.config.num_experts else ''}, {parameters:,} parameters, {args.dtype}, "
          f"{out.stat().st_size / 2 ** 20:.1f} MiB")
    return out


if __name__ == "__main__":
    # The command line promises one line per error: no progress bars, and no load reports (checked above instead).
    quiet_transformers()
    exit_on_input_error(main)()
