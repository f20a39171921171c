"""The preference stage: `torchrun --standalone --nproc_per_node=N model_rlhf_train.py --config FILE`.

Starts from an SFT model (`model.init_from`). Offline methods (`rlhf.method` dpo, ipo) learn from pairs of replies to
the same prompt, one preferred (`chosen`) and one not (`rejected`), pulled towards them against a frozen reference
model. The online method (grpo) samples the model's own replies to prompts, scores them with reward functions and
raises those that scored above their group's mean. Same engine, CLI, checkpoints, resume and logging as the other
stages; with `lora.enabled` only low-rank adapters are trained and the reference is the same model with its adapters
off.
"""

from utils.config import PreferenceConfig
from utils.data import PairCollator, PreferenceDataset, PromptCollator, PromptDataset
from utils.grpo import GRPO_METRICS, grpo_objective, grpo_rollout, grpo_targets
from utils.preference import PREFERENCE_METRICS, pairs_in, preference_objective
from utils.task import Task
from utils.trainer import run_training


def preference_datasets(tokenizer, config: PreferenceConfig, log):
    data = config.data
    train = PreferenceDataset(data.train_files, tokenizer, data.seq_len, data.strict, log)
    val = PreferenceDataset(data.val_files, tokenizer, data.seq_len, data.strict, log) if data.val_files else None
    return train, val


def prompt_datasets(tokenizer, config: PreferenceConfig, log):
    data, completion_tokens = config.data, config.rlhf.max_completion_tokens
    train = PromptDataset(data.train_files, tokenizer, data.seq_len, completion_tokens, data.strict, log)
    val = (PromptDataset(data.val_files, tokenizer, data.seq_len, completion_tokens, data.strict, log)
           if data.val_files else None)
    return train, val


GRPO = Task(datasets=prompt_datasets, collator=lambda tokenizer: PromptCollator(
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id),
            objective=grpo_objective, targets=grpo_targets, metrics=GRPO_METRICS, perplexity=False,
            config_type=PreferenceConfig, chat_sample=True, rollout=grpo_rollout,
            evaluate=lambda trainer: trainer.rollout.evaluate(), selection=("val_reward", True))

PREFERENCE = Task(datasets=preference_datasets, collator=lambda tokenizer: PairCollator(tokenizer.pad_token_id),
                  objective=preference_objective, targets=pairs_in, metrics=PREFERENCE_METRICS,
                  progress_metrics=("reward_accuracy", "reward_margin"), perplexity=False,
                  config_type=PreferenceConfig, chat_sample=True,
                  variant=lambda config: GRPO if config.rlhf.method == "grpo" else PREFERENCE)

if __name__ == "__main__":
    run_training(PREFERENCE, "configs/model_rlhf.yaml", __doc__.splitlines()[0])
