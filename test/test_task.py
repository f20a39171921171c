"""utils/task.py: what a training stage supplies; the default loss and target count of causal LM tasks."""

import pytest
import torch

from helpers import tiny_config
from model import ByteModel
from utils.task import Task, label_targets, language_model_loss


# --------------------------------------------------------------------------------------------------- 6. small pieces

def test_label_targets_shift_labels_and_labels():
    shift = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
             "shift_labels": torch.tensor([[1, 2, -100, 3], [-100, -100, 4, 5]])}
    assert label_targets(shift) == 5
    # `labels` are aligned with the inputs: the first position is never a target.
    labels = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
              "labels": torch.tensor([[7, 2, -100, 3], [-100, 1, -100, -100]])}
    assert label_targets(labels) == 3
    assert label_targets({"labels": torch.full((3, 5), -100)}) == 0
    assert isinstance(label_targets(shift), int)


@pytest.mark.parametrize("key", ["labels", "shift_labels"])
def test_label_targets_matches_the_models_loss_normalisation(key):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator)
    targets = torch.randint(0, 11, (2, 6), generator=generator)
    targets[0, 1] = targets[1, 3] = targets[1, 5] = -100
    batch = {key: targets}
    labels, shift_labels = (targets, None) if key == "labels" else (None, targets)
    mean = ByteModel.causal_lm_loss(logits, labels, None, shift_labels)
    summed = ByteModel.causal_lm_loss(logits, labels, label_targets(batch), shift_labels)
    torch.testing.assert_close(summed, mean)


def test_the_default_task_is_a_causal_language_model_loss():
    task = Task(datasets=lambda tokenizer, config, log: (None, None))
    assert task.objective(None) is language_model_loss and task.targets is label_targets and task.collator(None) is None
    torch.manual_seed(0)
    model = ByteModel(tiny_config()).train()
    batch = {"input_ids": torch.randint(0, 128, (2, 9)), "labels": torch.randint(0, 128, (2, 9))}
    summed = task.objective(None)(model, batch, task.targets(batch)).loss
    torch.testing.assert_close(summed, model(**batch).loss)
