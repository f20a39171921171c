"""Export a saved ByteModel as a plain transformers Llama (dense), Mistral (dense with a sliding window) or Mixtral
(MoE) folder: `python scripts/export_hf.py --model DIR --out DIR [--dtype fp32|bf16|fp16] [--force]`.

The result (config.json with model_type "llama", "mistral" or "mixtral", model.safetensors, generation_config.json
and the tokenizer when the source has them) loads with `AutoModelForCausalLM` without this project and gives the same
logits. Features the target cannot express (parallel residual, LayerScale, layers mixing sliding and full attention;
for MoE: shared experts, sigmoid routing, top-k weights that are not renormalised, dense layers between MoE layers, a
non-zero routing bias; any parameter the target lacks) are refused before anything is written; the folder is written
beside --out and renamed into place.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts scripts/ first on the path; import from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402
from transformers import (AutoTokenizer, GenerationConfig, LlamaForCausalLM, MistralForCausalLM,  # noqa: E402
                          MixtralForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)

from model import ByteModelConfig, mixtral_state_dict  # noqa: E402
from utils.checkpoint import load_model_folder  # noqa: E402
from utils.errors import InputError, error_summary, exit_on_input_error  # noqa: E402
from utils.files import publish_folder  # noqa: E402
from utils.logger import quiet_transformers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHOWN_KEYS = 3  # parameter names quoted in an error message


def check_expressible(config: ByteModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse the configured features that LlamaForCausalLM (dense), MistralForCausalLM (dense with a sliding window)
    or MixtralForCausalLM (MoE) cannot compute."""
    target = "Mixtral" if config.num_experts else "Mistral" if config.sliding_window is not None else "Llama"
    if len(set(config.layer_types)) > 1:
        raise InputError(f"layer_types mixing sliding and full attention cannot be exported: every {target} layer "
                         f"attends the same way")
    if config.parallel_residual:
        raise InputError(f"parallel_residual=True cannot be exported: {target}'s decoder layer is sequential "
                         f"(attention, then MLP)")
    if config.layer_scale_init is not None:
        raise InputError(f"layer_scale_init={config.layer_scale_init} cannot be exported: {target} has no "
                         f"LayerScale parameters")
    if not config.num_experts:
        return
    refusals = ((config.num_shared_experts, f"num_shared_experts={config.num_shared_experts}",
                 "Mixtral has no shared experts"),
                (config.scoring_func != "softmax", f"scoring_func={config.scoring_func!r}",
                 "Mixtral's router is a softmax"),
                (not config.norm_topk_prob, "norm_topk_prob=False", "Mixtral always renormalises the top-k weights"),
                (config.decoder_sparse_step != 1, f"decoder_sparse_step={config.decoder_sparse_step}",
                 "every Mixtral layer is a mixture of experts"),
                (config.attention_bias, "attention_bias=True", "Mixtral's attention has no biases"))
    for problem, setting, reason in refusals:
        if problem:
            raise InputError(f"{setting} cannot be exported: {reason}")
    biased = sorted(name for name, tensor in state_dict.items() if name.endswith("gate.expert_bias") and tensor.any())
    if biased:
        raise InputError(f"{biased[0]} is non-zero (router_bias_update_rate trained a routing bias) and cannot be "
                         f"exported: Mixtral's router has no bias, so it would choose different experts")


def target_config_from(config: ByteModelConfig, dtype: torch.dtype) -> PretrainedConfig:
    if config.num_experts:
        target = config.to_mixtral_config()
    else:
        target = config.to_mistral_config() if config.sliding_window is not None else config.to_llama_config()
    target.dtype = dtype
    return target


def build_target(state_dict: dict[str, torch.Tensor], target_config: PretrainedConfig) -> PreTrainedModel:
    """LlamaForCausalLM, MistralForCausalLM or MixtralForCausalLM holding `state_dict`, built on the meta device (no
    second copy of the weights, no init time); refuses names or shapes that differ from the target's."""
    model_class, target = {"mixtral": (MixtralForCausalLM, "Mixtral"), "mistral": (MistralForCausalLM, "Mistral")}.get(
        target_config.model_type, (LlamaForCausalLM, "Llama"))
    if model_class is MixtralForCausalLM:
        state_dict = mixtral_state_dict(state_dict)  # drops the routing biases, checked to be zero
    with torch.device("meta"):
        exported = model_class(target_config)
    expected = {name: tensor.shape for name, tensor in exported.state_dict().items()}
    for problem, names in ((f"parameters {target} lacks", sorted(set(state_dict) - set(expected))),
                           (f"{target} parameters missing from the model", sorted(set(expected) - set(state_dict)))):
        if names:
            more = f" (and {len(names) - SHOWN_KEYS} more)" if len(names) > SHOWN_KEYS else ""
            raise InputError(f"cannot be exported as {target}: {problem}: {', '.join(names[:SHOWN_KEYS])}{more}")
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name]:
            raise InputError(f"cannot be exported as {target}: {name} has shape {tuple(tensor.shape)}, {target} "
                             f"expects {tuple(expected[name])}")
    exported.load_state_dict(state_dict, strict=True, assign=True)
    exported.tie_weights()  # assign=True replaced lm_head's parameter; share it with the embedding again if tied
    return exported.eval()


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


def write_folder(folder: Path, exported: PreTrainedModel, generation_config: GenerationConfig | None,
                 tokenizer: PreTrainedTokenizerBase | None) -> None:
    if generation_config is not None:
        exported.generation_config = generation_config
    exported.save_pretrained(folder)
    if generation_config is None:
        # save_pretrained always writes the defaults derived from config.json; the source had no settings to keep.
        (folder / "generation_config.json").unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved ByteModel folder (final/, best/ or a checkpoint "
                                                       "step folder)")
    parser.add_argument("--out", required=True, help="the Llama or Mixtral folder to write")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype of the export (default fp32)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = parser.parse_args(argv)
    source, out, dtype = Path(args.model), Path(args.out), DTYPES[args.dtype]

    # Everything that can refuse runs before the first byte is written.
    check_out(out, source, args.force)
    model = load_model_folder(source)
    state_dict = {name: tensor.to(dtype) for name, tensor in model.state_dict().items()}
    check_expressible(model.config, state_dict)
    exported = build_target(state_dict, target_config_from(model.config, dtype))
    generation_config = load_generation_config(source)
    tokenizer = load_tokenizer(source)

    target = out.resolve()  # "--out ." has no name to put a sibling beside
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)  # left by an export that crashed
        temporary.mkdir()
        write_folder(temporary, exported, generation_config, tokenizer)
        publish_folder(temporary, target)
    except OSError as error:  # an unwritable place or a full disk: the user's to fix, like any other bad input
        raise InputError(f"cannot write {out}: {error}") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # only still there when writing failed

    if model.config.drop_path_rate > 0:
        print(f"note: drop_path_rate={model.config.drop_path_rate} (stochastic depth) is training-only and is not "
              f"part of the export; inference is unchanged")
    if (model.config.rope_parameters or {}).get("rope_type") == "dynamic":
        print(f"note: transformers scales dynamic RoPE for a whole sequence's length, this model causally for each "
              f"position's: logits agree up to max_position_embeddings={model.config.max_position_embeddings} tokens")
    if model.config.num_experts and model.config.moe_capacity_factor is not None:
        print(f"note: moe_capacity_factor={model.config.moe_capacity_factor} limits experts while training only; "
              f"inference was already dropless, as Mixtral is")
    parameters = sum(tensor.numel() for tensor in exported.parameters())
    extras = [name for name, present in (("generation config", generation_config), ("tokenizer", tokenizer))
              if present is not None]
    print(f"exported {source} -> {out}: {type(exported).__name__}, {parameters:,} parameters, {args.dtype}"
          + (f", with {' and '.join(extras)}" if extras else ""))
    return out


if __name__ == "__main__":
    # The command line promises one line per error: no progress bars, and no load reports (checked above instead).
    quiet_transformers()
    exit_on_input_error(main)()
