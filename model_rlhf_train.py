"""Preference optimization (DPO, IPO, conservative DPO): `torchrun --standalone --nproc_per_node=N
model_rlhf_train.py --config FILE`.

Starts from an SFT model (`model.init_from`) and learns from pairs of replies to the same prompt, one preferred
(`chosen`) and one not (`rejected`), pulled towards them against a frozen reference model (`rlhf.*`). Same engine,
CLI, checkpoints, resume and logging as the other stages; with `lora.enabled` only low-rank adapters are trained and
the reference is the same model with its adapters off.
"""

from utils.config import PreferenceConfig
from utils.data import PairCollator, PreferenceDataset
from utils.preference import PREFERENCE_METRICS, pairs_in, preference_objective
from utils.task import Task, run_training


def preference_datasets(tokenizer, config: PreferenceConfig, log):
    data = config.data
    train = PreferenceDataset(data.train_files, tokenizer, data.seq_len, data.strict, log)
    val = PreferenceDataset(data.val_files, tokenizer, data.seq_len, data.strict, log) if data.val_files else None
    return train, val


PREFERENCE = Task(datasets=preference_datasets, collator=lambda tokenizer: PairCollator(tokenizer.pad_token_id),
                  objective=preference_objective, targets=pairs_in, metrics=PREFERENCE_METRICS,
                  progress_metrics=("reward_accuracy", "reward_margin"), perplexity=False,
                  config_type=PreferenceConfig, chat_sample=True)

if __name__ == "__main__":
    run_training(PREFERENCE, "configs/model_rlhf.yaml", __doc__.splitlines()[0])
