"""Supervised fine-tuning: `torchrun --standalone --nproc_per_node=N model_sft_train.py --config FILE`.

Starts from any causal LM folder (`model.init_from`: this project's pretraining `final/`, or a transformers Llama
folder) and trains on chat conversations with loss on the assistant replies only. Same engine, CLI, checkpoints,
resume and logging as `model_pretrain.py`.
"""

from model_pretrain import add_arguments
from utils.config import TrainingConfig, exit_on_input_error, parse_config
from utils.data import PadCollator, SFTDataset
from utils.trainer import Trainer


def sft_datasets(tokenizer, config: TrainingConfig, log):
    data = config.data
    train = SFTDataset(data.train_files, tokenizer, data.seq_len, data.strict, log)
    val = SFTDataset(data.val_files, tokenizer, data.seq_len, data.strict, log) if data.val_files else None
    return train, val, PadCollator(tokenizer.pad_token_id)


@exit_on_input_error
def main() -> None:
    config, arguments = parse_config(TrainingConfig, "configs/model_sft.yaml", __doc__.splitlines()[0],
                                     add_arguments=add_arguments)
    summary = Trainer(config, sft_datasets, chat_sample=True).fit(arguments.resume)
    if summary["reason"].endswith("in a row"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
