"""What a model costs and what it looks like inside: `python utils/model_info.py [--config FILE | --model DIR]`.

Counts parameters (total, trainable, embedding, by component and per layer; for MoE also those active per token),
training FLOPs per token by component, training and inference memory, and, for a trained model, per-layer weight
statistics and, for MoE, how its routers spread text over the experts (`--data`). Prints a summary, writes
`model_info/<name>_report.md` and the pictures in `model_info/plots/`.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts utils/ first on the path; import from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from model import ByteModel, ByteModelConfig, moe_layers  # noqa: E402
from utils.checkpoint import load_model_folder  # noqa: E402
from utils.counting import flops_per_token, parameter_counts  # noqa: E402
from utils.config import ModelSection, build_config, model_config_from, read_yaml  # noqa: E402
from utils.data import document_texts, read_records  # noqa: E402
from utils.errors import InputError, exit_on_input_error  # noqa: E402
from utils.logger import quiet_transformers  # noqa: E402
from utils.router_monitor import load_statistics  # noqa: E402

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEMO_TEXT = "datasets/demo/pretrain_val.jsonl"
NEAR_ZERO = 1e-3  # |weight| below this counts as near zero in the checkpoint statistics


def training_memory(config: ByteModelConfig, parameters: int, seq_len: int, batch_size: int) -> dict[str, dict]:
    """Estimated training memory in bytes per precision (fp32, or bf16 autocast with fp32 master weights).

    Weights, gradients (fp32) and AdamW's two moments (fp32) follow from the parameter count. Activations follow
    Korthikanti et al. (2022) for a layer with a fused attention kernel, 34 * seq * batch * hidden bytes in 16 bits
    (attention matrices are not stored), plus the fp32 logits and their gradient; gradient checkpointing keeps
    only each layer's input and one layer's activations for the recomputation."""
    tokens = seq_len * batch_size
    logits = 2 * 4 * tokens * config.vocab_size
    rows = {}
    for precision, activation_scale in (("fp32", 2.0), ("bf16", 1.0)):
        per_layer = 34 * tokens * config.hidden_size * activation_scale
        checkpointed = (config.num_hidden_layers * 2 * tokens * config.hidden_size * activation_scale + per_layer)
        state = {"weights": 4 * parameters, "gradients": 4 * parameters, "adamw_states": 8 * parameters}
        rows[precision] = {**state, "activations": config.num_hidden_layers * per_layer + logits,
                           "activations_checkpointed": checkpointed + logits}
        rows[precision]["total"] = sum(state.values()) + rows[precision]["activations"]
        rows[precision]["total_checkpointed"] = sum(state.values()) + rows[precision]["activations_checkpointed"]
    return rows


def inference_memory(config: ByteModelConfig, parameters: int, contexts: list[int], precision: str = "bf16",
                     batch_size: int = 1) -> list[dict]:
    """Weights plus KV cache (keys and values of every layer) per context length, in bytes."""
    width = BYTES[precision]
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * width
    return [{"context": context, "weights": parameters * width, "kv_cache": kv_per_token * context * batch_size,
             "total": parameters * width + kv_per_token * context * batch_size} for context in contexts]


def weight_statistics(model: nn.Module) -> dict[str, list]:
    """Per layer and matrix: Frobenius norm and the fraction of near-zero entries. In an MoE layer gate_proj, up_proj
    and down_proj are those of all routed experts together."""
    matrices = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    norms, near_zero = [], []
    for layer in model.model.layers:
        weights = {name: getattr(layer.self_attn, name).weight for name in matrices[:4]}
        if hasattr(layer.mlp, "experts"):
            gate, up = layer.mlp.experts.gate_up_proj.chunk(2, dim=1)
            weights.update(gate_proj=gate, up_proj=up, down_proj=layer.mlp.experts.down_proj)
        else:
            weights.update({name: getattr(layer.mlp, name).weight for name in matrices[4:]})
        weights = [weights[name].detach().float() for name in matrices]
        norms.append([weight.norm().item() for weight in weights])
        near_zero.append([(weight.abs() < NEAR_ZERO).float().mean().item() for weight in weights])
    return {"matrices": list(matrices), "norms": norms, "near_zero_fraction": near_zero}


@torch.no_grad()
def routing_statistics(model: ByteModel, sequences: list[list[int]]) -> dict:
    """Route token sequences through an MoE model and report, per MoE layer, each expert's share of the token-slots,
    the fraction the training capacity limit would drop, and the balancing losses (aux 1.0 = balanced).

    The model runs in evaluation mode except its MoE layers, which run as in training so that a capacity limit
    applies (routing itself is the same in both modes)."""
    layers = moe_layers(model)
    model.eval()
    for layer in layers:
        layer.train()
    counts = torch.zeros(len(layers), layers[0].num_experts)
    dropped, aux, z, tokens = torch.zeros(len(layers)), torch.zeros(len(layers)), torch.zeros(len(layers)), 0
    try:
        for sequence in sequences:
            model(torch.tensor([sequence]), use_cache=False)
            for index, layer in enumerate(layers):
                stats = layer.router_stats
                counts[index] += stats.expert_counts.float().cpu()
                dropped[index] += float(stats.dropped)
                aux[index] += float(stats.aux_loss) * len(sequence)
                z[index] += float(stats.z_loss) * len(sequence)
            tokens += len(sequence)
    finally:
        model.eval()
    load = load_statistics(counts, dropped)
    layer_indices = [index for index in range(model.config.num_hidden_layers) if model.config.is_moe_layer(index)]
    return {"tokens": tokens, "layers": layer_indices, **{key: value.tolist() for key, value in load.items()},
            "aux_loss": (aux / max(tokens, 1)).tolist(), "z_loss": (z / max(tokens, 1)).tolist()}


def routing_input(args: argparse.Namespace, model_folder: Path, seq_len: int,
                  vocab_size: int) -> list[list[int]] | None:
    """The token windows to route: --data (default: the demo text) encoded with --tokenizer (default: the model
    folder's own, else the demo tokenizer). None, with a note, when the defaults do not fit the model (the demo
    tokenizer's ids outrun a smaller vocabulary); asked for explicitly, that is an input error instead."""
    from transformers import AutoTokenizer

    explicit = args.data is not None or args.tokenizer is not None
    folder = Path(args.tokenizer) if args.tokenizer else (
        model_folder if (model_folder / "tokenizer.json").is_file() else Path("tokenizer"))
    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"no tokenizer in {folder} to encode --data with; pass --tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) > vocab_size:
        message = (f"the tokenizer in {folder} has {len(tokenizer)} ids, the model's vocabulary only {vocab_size}: "
                   f"pass --tokenizer with the model's own")
        if explicit:
            raise InputError(message)
        print(f"routing section skipped: {message}")
        return None
    return routing_sequences(Path(args.data or DEMO_TEXT), tokenizer, seq_len, args.routing_tokens)


def routing_sequences(data: Path, tokenizer, seq_len: int, max_tokens: int) -> list[list[int]]:
    """Up to `max_tokens` tokens of a JSONL text file, in windows of at most seq_len."""
    ids: list[int] = []
    for _, record in read_records([data]):
        for text in document_texts(record):
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if not ids:
        raise InputError(f"--data {data} holds no text")
    return [ids[start:start + seq_len] for start in range(0, len(ids), seq_len)]


# ---------------------------------------------------------------- loading


def config_from_yaml(path: Path) -> tuple[ByteModelConfig, int]:
    """The model a training config describes, and its data.seq_len (1024 when absent)."""
    values = read_yaml(path)
    if not isinstance(values.get("model"), dict):
        raise InputError(f"{path}: no 'model' section")
    data = values.get("data") or {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: section 'data' must be a mapping")
    try:
        section = build_config(_ModelOnly, {"model": values["model"]}).model
        tokenizer = data.get("tokenizer") or "tokenizer"
        config = model_config_from(section, vocab_size=_tokenizer_vocab_size(str(tokenizer), path))
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    seq_len = data.get("seq_len", 1024)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise InputError(f"{path}: data.seq_len must be a positive integer, got {seq_len!r}")
    return config, seq_len


@dataclass
class _ModelOnly:
    model: ModelSection


def _tokenizer_vocab_size(folder: str, config_path: Path) -> int:
    """The vocabulary the scripts would use: the tokenizer's, read from its files (no need to load it)."""
    tokenizer_file = Path(folder) / "tokenizer.json"
    if not tokenizer_file.is_file():
        tokenizer_file = config_path.resolve().parents[1] / folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        return ByteModelConfig().vocab_size
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    ids = list(data["model"]["vocab"].values()) + [token["id"] for token in data.get("added_tokens", [])]
    return max(ids) + 1


# ---------------------------------------------------------------- the report


def build_report(model: ByteModel, seq_len: int, batch_size: int, trained: bool,
                 routing_data: list[list[int]] | None = None) -> dict:
    config = model.config
    counts = parameter_counts(model)
    flops = flops_per_token(config, seq_len)
    report = {
        "config": {key: getattr(config, key) for key in ("vocab_size", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "head_dim", "tie_word_embeddings",
                                                         "max_position_embeddings")},
        **({"moe": {key: getattr(config, key) for key in (
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_shared_experts", "decoder_sparse_step",
            "moe_capacity_factor", "scoring_func", "norm_topk_prob", "router_aux_loss_coef", "router_z_loss_coef",
            "router_bias_update_rate")}} if config.num_experts else {}),
        "parameters": counts,
        "seq_len": seq_len, "batch_size": batch_size,
        "flops_per_token": {**flops, "total": sum(flops.values())},
        "flops_per_sequence": sum(flops.values()) * seq_len,
        "training_memory": training_memory(config, counts["total"], seq_len, batch_size),
        "inference_memory": inference_memory(config, counts["total"],
                                             sorted({256, 1024, 4096, config.max_position_embeddings})),
    }
    if trained:
        report["weights"] = weight_statistics(model)
    if routing_data:
        report["routing"] = routing_statistics(model, routing_data)
    return report


def human(value: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def mebibytes(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def write_plots(report: dict, name: str, plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    components = report["parameters"]["by_component"]
    left.bar(list(components), [value / 1e6 for value in components.values()], color="#4c72b0")
    left.set_ylabel("parameters (M)")
    left.set_title("parameters by component")
    per_layer = report["parameters"]["per_layer"]
    bottom = [0.0] * len(per_layer)
    for component, colour in (("attention", "#4c72b0"), ("mlp", "#dd8452"), ("norms", "#55a868")):
        values = [layer[component] / 1e6 for layer in per_layer]
        right.bar(range(len(per_layer)), values, bottom=bottom, label=component, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_xlabel("layer")
    right.set_ylabel("parameters (M)")
    right.set_title("parameters per layer")
    right.legend()
    figure.tight_layout()
    written.append(_save(figure, plots / f"{name}_parameters.png"))

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    memory = report["training_memory"]
    parts = ("weights", "gradients", "adamw_states", "activations")
    labels = [f"{precision}\n{mode}" for precision in memory for mode in ("full", "checkpointed")]
    bottom = [0.0] * len(labels)
    for part, colour in zip(parts, ("#4c72b0", "#dd8452", "#55a868", "#c44e52")):
        values = []
        for precision in memory:
            for mode in ("full", "checkpointed"):
                key = part if part != "activations" or mode == "full" else "activations_checkpointed"
                values.append(memory[precision][key] / 2**20)
        left.bar(labels, values, bottom=bottom, label=part, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_ylabel("MiB")
    left.set_title(f"training memory (batch {report['batch_size']} x {report['seq_len']})")
    left.legend(fontsize=8)
    inference = report["inference_memory"]
    right.plot([row["context"] for row in inference], [row["total"] / 2**20 for row in inference], marker="o",
               label="weights + KV cache")
    right.plot([row["context"] for row in inference], [row["weights"] / 2**20 for row in inference], linestyle="--",
               label="weights")
    right.set_xscale("log", base=2)
    right.set_xlabel("context length (tokens)")
    right.set_ylabel("MiB (bf16, batch 1)")
    right.set_title("inference memory")
    right.legend()
    figure.tight_layout()
    written.append(_save(figure, plots / f"{name}_memory.png"))

    if "weights" in report:
        weights = report["weights"]
        figure, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(weights["norms"]) + 2.5))
        for axis, key, title in ((axes[0], "norms", "weight norm"),
                                 (axes[1], "near_zero_fraction", f"fraction |w| < {NEAR_ZERO:g}")):
            image = axis.imshow(weights[key], aspect="auto", cmap="viridis")
            axis.set_xticks(range(len(weights["matrices"])), weights["matrices"], rotation=45, ha="right")
            axis.set_yticks(range(len(weights[key])))
            axis.set_ylabel("layer")
            axis.set_title(title)
            figure.colorbar(image, ax=axis)
        figure.tight_layout()
        written.append(_save(figure, plots / f"{name}_weights.png"))

    if "routing" in report:
        routing = report["routing"]
        figure, axis = plt.subplots(figsize=(max(5.0, 0.5 * len(routing["expert_load"][0]) + 3),
                                             0.5 * len(routing["layers"]) + 2.5))
        image = axis.imshow(routing["expert_load"], aspect="auto", cmap="magma")
        axis.set_xlabel("expert")
        axis.set_yticks(range(len(routing["layers"])), routing["layers"])
        axis.set_ylabel("layer")
        axis.set_title("share of token-slots per expert")
        figure.colorbar(image, ax=axis)
        figure.tight_layout()
        written.append(_save(figure, plots / f"{name}_routing.png"))
    return written


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def markdown(report: dict, name: str, source: str, plots: list[Path], out_dir: Path) -> str:
    counts = report["parameters"]
    lines = [f"# Model report: {name}", "", f"Source: `{source}`", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in {**report["config"], **report.get("moe", {})}.items()]
    lines += ["", "## Parameters", "", "| | count |", "|---|---|",
              f"| total | {counts['total']:,} |", f"| trainable | {counts['trainable']:,} |",
              f"| embedding | {counts['embedding']:,} |", f"| non-embedding | {counts['non_embedding']:,} |"]
    if "active_per_token" in counts:
        lines.append(f"| active per token (k of the routed experts) | {counts['active_per_token']:,} |")
    lines += [f"| {component} | {count:,} |" for component, count in counts["by_component"].items()]
    lines += ["", "| layer | attention | mlp | norms |", "|---|---|---|---|"]
    lines += [f"| {index} | {layer['attention']:,} | {layer['mlp']:,} | {layer['norms']:,} |"
              for index, layer in enumerate(counts["per_layer"])]
    flops = report["flops_per_token"]
    lines += ["", f"## Training FLOPs (forward + backward), sequence length {report['seq_len']}", "",
              "| component | per token | share |", "|---|---|---|"]
    lines += [f"| {component} | {human(value)} | {value / flops['total']:.1%} |"
              for component, value in flops.items() if component != "total"]
    lines += [f"| total | {human(flops['total'])} | |", "",
              f"Per sequence of {report['seq_len']} tokens: {human(report['flops_per_sequence'])}FLOP. "
              "Attention scores count the full square, as PyTorch's FlopCounterMode does."]
    lines += ["", f"## Training memory (estimate, batch {report['batch_size']} x {report['seq_len']} tokens)", "",
              "| precision | weights | gradients | AdamW | activations | total | activations (checkpointed) "
              "| total (checkpointed) |", "|---|---|---|---|---|---|---|---|"]
    for precision, row in report["training_memory"].items():
        lines.append(f"| {precision} | {mebibytes(row['weights'])} | {mebibytes(row['gradients'])} | "
                     f"{mebibytes(row['adamw_states'])} | {mebibytes(row['activations'])} | "
                     f"{mebibytes(row['total'])} | {mebibytes(row['activations_checkpointed'])} | "
                     f"{mebibytes(row['total_checkpointed'])} |")
    lines += ["", "## Inference memory (bf16, batch 1)", "", "| context | weights | KV cache | total |",
              "|---|---|---|---|"]
    lines += [f"| {row['context']} | {mebibytes(row['weights'])} | {mebibytes(row['kv_cache'])} | "
              f"{mebibytes(row['total'])} |" for row in report["inference_memory"]]
    if "weights" in report:
        weights = report["weights"]
        lines += ["", "## Weights", "", "| layer | " + " | ".join(weights["matrices"]) + " |",
                  "|---|" + "---|" * len(weights["matrices"])]
        lines += [f"| {index} | " + " | ".join(f"{norm:.2f} ({zero:.1%})" for norm, zero in zip(norms, zeros)) + " |"
                  for index, (norms, zeros) in enumerate(zip(weights["norms"], weights["near_zero_fraction"]))]
        lines += ["", f"Frobenius norm (fraction of entries with |w| < {NEAR_ZERO:g}); in MoE layers gate/up/down "
                  "are all routed experts together."]
    if "routing" in report:
        routing = report["routing"]
        experts = len(routing["expert_load"][0])
        lines += ["", f"## Routing ({routing['tokens']:,} tokens of `{report.get('routing_source', 'data')}`)", "",
                  "Share of token-slots per expert (1/experts = balanced); max load = busiest share x experts; "
                  "dropped = share the training capacity limit drops; aux loss 1.0 = balanced.", "",
                  "| layer | " + " | ".join(f"e{index}" for index in range(experts))
                  + " | max load | dropped | aux loss | z-loss |", "|---|" + "---|" * (experts + 4)]
        for index, layer in enumerate(routing["layers"]):
            lines.append(f"| {layer} | " + " | ".join(f"{share:.3f}" for share in routing["expert_load"][index])
                         + f" | {routing['max_load'][index]:.2f} | {routing['dropped_frac'][index]:.1%} | "
                         f"{routing['aux_loss'][index]:.3f} | {routing['z_loss'][index]:.2f} |")
    lines += [""] + [f"![{path.stem}]({path.relative_to(out_dir).as_posix()})" for path in plots] + [""]
    return "\n".join(lines)


def print_summary(report: dict, name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    counts, flops = report["parameters"], report["flops_per_token"]
    active = (f", {counts['active_per_token'] / 1e6:.2f}M active per token" if "active_per_token" in counts else "")
    table = Table(title=f"{name}: {counts['total'] / 1e6:.2f}M parameters{active}")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("training FLOPs/token", justify="right")
    for component, count in counts["by_component"].items():
        table.add_row(component, f"{count:,}", human(flops.get(component, 0.0)))
    table.add_row("total", f"{counts['total']:,}", human(flops["total"]))
    console = Console()
    console.print(table)
    fp32 = report["training_memory"]["fp32"]
    console.print(f"training memory (fp32, batch {report['batch_size']} x {report['seq_len']}): "
                  f"{mebibytes(fp32['total'])}, with gradient checkpointing {mebibytes(fp32['total_checkpointed'])}")
    if "routing" in report:
        routing = report["routing"]
        console.print("routing (max load, 1.0 = balanced): " + ", ".join(
            f"layer {layer} {load:.2f}" for layer, load in zip(routing["layers"], routing["max_load"])))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="a training config; its model section is reported "
                                         "(default: configs/model_pretrain.yaml)")
    source.add_argument("--model", help="a saved model folder (final/, best/ or a checkpoint step folder)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs and memory "
                                                                   "(default: the config's data.seq_len, or 1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch for the training memory estimate")
    parser.add_argument("--out", default="model_info", help="folder of the report (plots go to OUT/plots)")
    parser.add_argument("--name", help="report name (default: from the config or model folder)")
    parser.add_argument("--data", help=f"MoE models given with --model: text (JSONL) to measure expert load on "
                                       f"(default: {DEMO_TEXT})")
    parser.add_argument("--tokenizer", help="tokenizer for --data (default: the model folder's, else tokenizer/)")
    parser.add_argument("--routing-tokens", type=int, default=8192, help="tokens of --data to route (default 8192)")
    args = parser.parse_args(argv)
    quiet_transformers()

    if args.seq_len is not None and args.seq_len < 1 or args.batch_size < 1:
        raise InputError("--seq-len and --batch-size must be positive")
    if args.model:
        path = Path(args.model)
        model, trained = load_model_folder(path), True
        folder = path.resolve()
        name = args.name or (f"{folder.parent.name}_{folder.name}" if folder.name in ("final", "best")
                             else folder.name)
        seq_len = args.seq_len or 1024
    else:
        path = Path(args.config or "configs/model_pretrain.yaml")
        config, config_seq_len = config_from_yaml(path)
        with torch.device("meta"):  # counting needs shapes only: no memory, no init time
            model = ByteModel(config)
        trained = False
        name = args.name or path.stem
        seq_len = args.seq_len or config_seq_len
    routing_data = None
    if trained and model.config.num_experts and args.routing_tokens > 0:
        routing_data = routing_input(args, path, min(seq_len, model.config.max_position_embeddings),
                                     model.config.vocab_size)
    report = build_report(model, seq_len, args.batch_size, trained, routing_data)
    if routing_data:
        report["routing_source"] = args.data or DEMO_TEXT
    out_dir = Path(args.out)
    plots = write_plots(report, name, out_dir / "plots")
    report_path = out_dir / f"{name}_report.md"
    report_path.write_text(markdown(report, name, str(path), plots, out_dir), encoding="utf-8")
    (out_dir / f"{name}_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print_summary(report, name)
    print(f"report written to {report_path}")
    return report_path


if __name__ == "__main__":
    exit_on_input_error(main)()
