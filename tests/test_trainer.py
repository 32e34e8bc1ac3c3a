"""siftune.trainer.Trainer: SIFT inside the transformers Trainer loop."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from siftune import SiftConfig, SparseIncrement  # noqa: E402
from _models import contains_token_dataset, params, tiny_bert_classifier  # noqa: E402

TARGETS = ["query", "value", "attention.output.dense"]


def mean_loss(model, rows) -> float:
    model.eval()
    batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
    with torch.no_grad():
        loss = float(model(**batch).loss)
    model.train()
    return loss


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training run shared by the tests: (base, trainer, rows, loss before, loss after)."""
    from transformers import TrainingArguments, default_data_collator

    from siftune.trainer import Trainer

    rows = contains_token_dataset(64)
    base = tiny_bert_classifier()
    model = copy.deepcopy(base)
    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("trainer")), per_device_train_batch_size=8,
        gradient_accumulation_steps=2, num_train_epochs=12, learning_rate=5e-2, max_grad_norm=1.0,
        lr_scheduler_type="linear", report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        seed=0, data_seed=0, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                      sift_config=SiftConfig(density=0.05, target_modules=TARGETS, dense_modules=["classifier"]))
    before = mean_loss(model, rows)
    trainer.train()
    after = mean_loss(model, rows)
    return base, trainer, rows, before, after


def test_trainer_runs_the_expected_number_of_optimizer_steps(run):
    _, trainer, _, _, _ = run
    assert trainer.state.global_step == 12 * 64 // (8 * 2)
    assert trainer.sift.steps == trainer.state.global_step


def test_training_lowers_the_loss(run):
    _, _, _, before, after = run
    assert after < before - 0.04, (before, after)


def test_every_targeted_tensor_changes(run):
    base, trainer, _, _, _ = run
    unchanged = [s.name for s in trainer.sift.slots
                 if torch.equal(trainer.model.get_parameter(s.name), base.get_parameter(s.name))]
    assert len(trainer.sift.slots) == 2 * 3 and not unchanged, unchanged


def test_targeted_tensors_change_only_at_selected_indices(run):
    base, trainer, _, _, _ = run
    for slot in trainer.sift.slots:
        new = trainer.model.get_parameter(slot.name).detach().reshape(-1)
        old = base.get_parameter(slot.name).detach().reshape(-1)
        changed = torch.nonzero(new != old).squeeze(1)
        assert torch.isin(changed, slot.ever_idx).all(), slot.name
        assert slot.ever_idx.numel() == round(0.05 * old.numel())


def test_untargeted_parameters_stay_bit_identical(run):
    base, trainer, _, _, _ = run
    trained = params(trainer.model)
    sparse = {s.name for s in trainer.sift.slots}
    frozen = [n for n in trained if n not in sparse and not n.startswith("classifier.")]
    assert len(frozen) > 20
    for name in frozen:
        assert torch.equal(trained[name], params(base)[name]), name


def test_dense_classifier_changes(run):
    base, trainer, _, _, _ = run
    for name in ("classifier.weight", "classifier.bias"):
        assert not torch.equal(trainer.model.get_parameter(name), base.get_parameter(name)), name


def test_saved_increment_applied_to_a_fresh_base_reproduces_the_trained_logits(run, tmp_path):
    base, trainer, rows, _, _ = run
    trainer.save_model(str(tmp_path / "inc"))
    increment = SparseIncrement.load(tmp_path / "inc")
    fresh = increment.apply(copy.deepcopy(base)).eval()
    trainer.model.eval()
    ids = torch.stack([r["input_ids"] for r in rows[:16]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trainer.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_update_in_backward_trains_under_the_trainer_and_refuses_accumulation(tmp_path):
    from transformers import TrainingArguments, default_data_collator

    from siftune import ConfigError
    from siftune.trainer import Trainer

    rows = contains_token_dataset(32)
    sift_config = SiftConfig(density=0.05, target_modules=TARGETS, dense_modules=["classifier"],
                             update_in_backward=True)

    def trainer(accumulation):
        args = TrainingArguments(
            output_dir=str(tmp_path / str(accumulation)), per_device_train_batch_size=8,
            gradient_accumulation_steps=accumulation, num_train_epochs=6, learning_rate=5e-2, max_grad_norm=0,
            report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0)
        return Trainer(model=tiny_bert_classifier(), args=args, train_dataset=rows,
                       data_collator=default_data_collator, sift_config=sift_config)

    plain = trainer(1)
    before = mean_loss(plain.model, rows)
    plain.train()
    assert mean_loss(plain.model, rows) < before
    with pytest.raises(ConfigError, match="gradient accumulation"):
        trainer(2).train()


def small_trainer(output_dir, **overrides):
    """A plain SIFT Trainer on the tiny classifier; ``overrides`` go to TrainingArguments or the Trainer."""
    from transformers import TrainingArguments, default_data_collator

    from siftune.trainer import Trainer

    trainer_keys = {"optimizers", "eval_dataset"}
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=8, num_train_epochs=1, report_to=[],
                    use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0)
    settings.update({k: v for k, v in overrides.items() if k not in trainer_keys})
    return Trainer(model=tiny_bert_classifier(), args=TrainingArguments(**settings),
                   train_dataset=contains_token_dataset(16), data_collator=default_data_collator,
                   sift_config=SiftConfig(density=0.05, target_modules=TARGETS, dense_modules=["classifier"]),
                   **{k: v for k, v in overrides.items() if k in trainer_keys})


def test_an_optimizer_passed_to_the_trainer_is_a_config_error(tmp_path):
    from siftune import ConfigError

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="optimizers"):
        small_trainer(tmp_path, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_model_init_is_a_config_error(tmp_path):
    from transformers import TrainingArguments

    from siftune import ConfigError
    from siftune.trainer import Trainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="model_init"):
        Trainer(model_init=lambda: tiny_bert_classifier(), args=args, train_dataset=contains_token_dataset(8),
                sift_config=SiftConfig(density=0.05, target_modules=TARGETS))


def test_an_optim_other_than_adamw_is_a_config_error(tmp_path):
    from siftune import ConfigError

    with pytest.raises(ConfigError, match="optim='adafactor'"):
        small_trainer(tmp_path, optim="adafactor")


def test_resuming_from_a_trainer_checkpoint_is_a_config_error(tmp_path):
    from siftune import ConfigError

    with pytest.raises(ConfigError, match="cannot resume"):
        small_trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path))


def test_load_best_model_at_end_is_a_config_error(tmp_path):
    from siftune import ConfigError

    with pytest.raises(ConfigError, match="load_best_model_at_end"):
        small_trainer(tmp_path, load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch",
                      metric_for_best_model="loss", eval_dataset=contains_token_dataset(8))


def test_saved_increment_records_the_classification_task_and_label_names(run, tmp_path):
    _, trainer, _, _, _ = run
    trainer.save_model(str(tmp_path / "inc"))
    metadata = SparseIncrement.load(tmp_path / "inc").metadata
    assert metadata["task"] == "classification" and metadata["labels"] == ["LABEL_0", "LABEL_1"]


def test_saved_model_card_shows_the_first_and_the_last_evaluation(tmp_path):
    trainer = small_trainer(tmp_path)
    rows = contains_token_dataset(16)
    before = trainer.evaluate(eval_dataset=rows)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(eval_dataset=rows)["eval_loss"]
    trainer.save_model(str(tmp_path / "inc"))
    card = (tmp_path / "inc" / "README.md").read_text()
    assert "| metric | eval at step 0 | eval at step 2 |" in card
    assert f"| loss | {before:.4g} | {after:.4g} |" in card and "runtime" not in card


def test_a_selection_made_before_trainer_train_trains_from_the_first_step(tmp_path):
    import itertools

    from transformers import TrainingArguments, default_data_collator

    from siftune.trainer import Trainer

    def one_step(select: bool):
        base = tiny_bert_classifier()
        model = copy.deepcopy(base)
        args = TrainingArguments(output_dir=str(tmp_path / str(select)), per_device_train_batch_size=4, max_steps=1,
                                 learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="no",
                                 logging_strategy="no", seed=0, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=contains_token_dataset(16),
                          data_collator=default_data_collator,
                          sift_config=SiftConfig(density=0.05, target_modules=TARGETS, dense_modules=["classifier"],
                                                 selection_batches=3))
        if select:
            assert trainer.sift.select(itertools.islice(trainer.get_train_dataloader(), 3)) == 3
        trainer.train()
        return [n for n, p in params(model).items() if any(t in n for t in TARGETS) and n.endswith("weight")
                and not torch.equal(p, params(base)[n])]

    assert one_step(select=False) == []  # a 3-batch window is not complete after one step
    assert len(one_step(select=True)) == 2 * len(TARGETS)  # the tiny model's two layers
