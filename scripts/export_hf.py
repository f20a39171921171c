"""Export a saved ByteModel as a plain transformers Llama folder:
`python scripts/export_hf.py --model DIR --out DIR [--dtype fp32|bf16|fp16] [--force]`.

The result (config.json with model_type "llama", model.safetensors, generation_config.json and the tokenizer when
the source has them) loads with `LlamaForCausalLM.from_pretrained` or `AutoModelForCausalLM` without this project
and gives the same logits. Features Llama cannot express (parallel residual, LayerScale, MoE, any parameter Llama
lacks) are refused before anything is written; the folder is written beside --out and renamed into place.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts scripts/ first on the path; import from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402
from transformers import (AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          PreTrainedTokenizerBase)
from transformers.utils import logging as hf_logging  # noqa: E402

from model import ByteModelConfig  # noqa: E402
from utils.checkpoint import load_model_folder, publish_folder  # noqa: E402
from utils.config import InputError, error_summary, exit_on_input_error  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHOWN_KEYS = 3  # parameter names quoted in an error message


def check_expressible(config: ByteModelConfig) -> None:
    """Refuse the configured features that LlamaForCausalLM has no way to compute."""
    if config.parallel_residual:
        raise InputError("parallel_residual=True cannot be exported: Llama's decoder layer is sequential "
                         "(attention, then MLP)")
    if config.layer_scale_init is not None:
        raise InputError(f"layer_scale_init={config.layer_scale_init} cannot be exported: Llama has no LayerScale "
                         f"parameters")
    moe = [f"{key}={value!r}" for key, value in sorted(config.to_dict().items()) if key.startswith("moe_") and value]
    if moe:
        raise InputError(f"{', '.join(moe)}: a mixture-of-experts model cannot be exported as Llama; MoE models have "
                         f"their own Mixtral export")


def llama_config_from(config: ByteModelConfig, dtype: torch.dtype) -> LlamaConfig:
    llama = config.to_llama_config()
    llama.dtype = dtype
    return llama


def build_llama(state_dict: dict[str, torch.Tensor], llama_config: LlamaConfig) -> LlamaForCausalLM:
    """LlamaForCausalLM holding `state_dict`, built on the meta device (no second copy of the weights, no init
    time); refuses names or shapes that differ from Llama's."""
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config)
    expected = {name: tensor.shape for name, tensor in llama.state_dict().items()}
    for problem, names in (("parameters Llama lacks", sorted(set(state_dict) - set(expected))),
                           ("Llama parameters missing from the model", sorted(set(expected) - set(state_dict)))):
        if names:
            more = f" (and {len(names) - SHOWN_KEYS} more)" if len(names) > SHOWN_KEYS else ""
            raise InputError(f"cannot be exported as Llama: {problem}: {', '.join(names[:SHOWN_KEYS])}{more}")
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name]:
            raise InputError(f"cannot be exported as Llama: {name} has shape {tuple(tensor.shape)}, Llama expects "
                             f"{tuple(expected[name])}")
    llama.load_state_dict(state_dict, strict=True, assign=True)
    llama.tie_weights()  # assign=True replaced lm_head's parameter; share it with the embedding again if tied
    return llama.eval()


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The source folder's tokenizer, or None when it has none (a checkpoint step folder)."""
    if not (path / "tokenizer.json").is_file():
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise InputError(f"cannot read the tokenizer in {path}: {error_summary(error)}") from None


def load_generation_config(path: Path) -> GenerationConfig | None:
    if not (path / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(path)
    except Exception as error:
        raise InputError(f"cannot read {path / 'generation_config.json'}: {error_summary(error)}") from None


def check_out(out: Path, source: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out} exists and is not empty; pass --force to replace it")
    resolved_out, resolved_source = out.resolve(), source.resolve()
    if resolved_out == resolved_source or resolved_out in resolved_source.parents:
        raise InputError(f"--out {out} would replace the --model folder {source}")


def write_folder(folder: Path, llama: LlamaForCausalLM, generation_config: GenerationConfig | None,
                 tokenizer: PreTrainedTokenizerBase | None) -> None:
    if generation_config is not None:
        llama.generation_config = generation_config
    llama.save_pretrained(folder)
    if generation_config is None:
        # save_pretrained always writes the defaults derived from config.json; the source had no settings to keep.
        (folder / "generation_config.json").unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved ByteModel folder (final/, best/ or a checkpoint "
                                                       "step folder)")
    parser.add_argument("--out", required=True, help="the Llama folder to write")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype of the export (default fp32)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = parser.parse_args(argv)
    source, out, dtype = Path(args.model), Path(args.out), DTYPES[args.dtype]

    # Everything that can refuse runs before the first byte is written.
    check_out(out, source, args.force)
    model = load_model_folder(source)
    check_expressible(model.config)
    llama_config = llama_config_from(model.config, dtype)
    state_dict = {name: tensor.to(dtype) for name, tensor in model.state_dict().items()}
    llama = build_llama(state_dict, llama_config)
    generation_config = load_generation_config(source)
    tokenizer = load_tokenizer(source)

    target = out.resolve()  # "--out ." has no name to put a sibling beside
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)  # left by an export that crashed
        temporary.mkdir()
        write_folder(temporary, llama, generation_config, tokenizer)
        publish_folder(temporary, target)
    except OSError as error:  # an unwritable place or a full disk: the user's to fix, like any other bad input
        raise InputError(f"cannot write {out}: {error}") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # only still there when writing failed

    if model.config.drop_path_rate > 0:
        print(f"note: drop_path_rate={model.config.drop_path_rate} (stochastic depth) is training-only and is not "
              f"part of the Llama export; inference is unchanged")
    parameters = sum(tensor.numel() for tensor in llama.parameters())
    extras = [name for name, present in (("generation config", generation_config), ("tokenizer", tokenizer))
              if present is not None]
    print(f"exported {source} -> {out}: LlamaForCausalLM, {parameters:,} parameters, {args.dtype}"
          + (f", with {' and '.join(extras)}" if extras else ""))
    return out


if __name__ == "__main__":
    # The command line promises one line per error: no progress bars, and no load reports (checked above instead).
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    exit_on_input_error(main)()
