"""Pretrain a StellarByte model: `torchrun --standalone --nproc_per_node=N model_pretrain.py --config FILE`.

Also runs as a single process with `python model_pretrain.py`. Every config key can be overridden as
`--section.key value`; `--resume auto` continues from the latest usable checkpoint in train.out_dir.
"""

from utils.config import TrainingConfig
from utils.data import PretrainDataset, StreamingPretrainDataset
from utils.distributed import rank_and_world_size
from utils.task import Task
from utils.trainer import run_training


def pretrain_datasets(tokenizer, config: TrainingConfig, log):
    data = config.data
    if data.streaming:
        rank, world_size = rank_and_world_size()
        train = StreamingPretrainDataset(data.train_files, tokenizer, data.seq_len, rank, world_size, data.strict,
                                         text_field=data.text_field)
    else:
        train = PretrainDataset(data.train_files, tokenizer, data.seq_len, data.cache_dir, data.strict, log,
                                data.text_field)
    val = (PretrainDataset(data.val_files, tokenizer, data.seq_len, data.cache_dir, data.strict, log, data.text_field)
           if data.val_files else None)
    return train, val


PRETRAINING = Task(datasets=pretrain_datasets)

if __name__ == "__main__":
    run_training(PRETRAINING, "configs/model_pretrain.yaml", __doc__.splitlines()[0])
