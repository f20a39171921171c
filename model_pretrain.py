"""Pretrain a StellarByte model: `torchrun --standalone --nproc_per_node=N model_pretrain.py --config FILE`.

Also runs as a single process with `python model_pretrain.py`. Every config key can be overridden as
`--section.key value`; `--resume auto` continues from the latest usable checkpoint in train.out_dir.
"""

from utils.config import TrainingConfig, parse_config
from utils.errors import exit_on_input_error
from utils.data import PretrainDataset, StreamingPretrainDataset
from utils.distributed import rank_and_world_size
from utils.trainer import Trainer


def pretrain_datasets(tokenizer, config: TrainingConfig, log):
    data = config.data
    if data.streaming:
        rank, world_size = rank_and_world_size()
        train = StreamingPretrainDataset(data.train_files, tokenizer, data.seq_len, rank, world_size, data.strict)
    else:
        train = PretrainDataset(data.train_files, tokenizer, data.seq_len, data.cache_dir, data.strict, log)
    val = (PretrainDataset(data.val_files, tokenizer, data.seq_len, data.cache_dir, data.strict, log)
           if data.val_files else None)
    return train, val, None


def add_arguments(parser) -> None:
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the latest checkpoint in train.out_dir (auto) or from a step folder")


@exit_on_input_error
def main() -> None:
    config, arguments = parse_config(TrainingConfig, "configs/model_pretrain.yaml", __doc__.splitlines()[0],
                                     add_arguments=add_arguments)
    summary = Trainer(config, pretrain_datasets).fit(arguments.resume)
    if summary["reason"].endswith("in a row"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
