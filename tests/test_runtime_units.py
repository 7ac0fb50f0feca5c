"""Runtime pieces in isolation: batching, loss masking, metrics, the build contract."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from runtime.contract.config import IncompatibleBuildError, ModelSpec, load_runtime_config
from runtime.core.data import (
    IGNORE_INDEX, Encoded, collate_for_training, collate_prompts_left_padded, length_grouped_batches,
)
from runtime.core.classify import extract_label
from runtime.evaluate import classification_report
from runtime.core.losses import TokenLoss
from runtime.core.model import build_model


def _examples() -> list[Encoded]:
    return [
        Encoded(prompt=(5, 6, 7), completion=(8,), label="a", line=1),
        Encoded(prompt=(9,), completion=(10, 11), label="b", line=2),
        Encoded(prompt=(1, 2, 3, 4, 5), completion=(6,), label="a", line=3),
    ]


def test_training_collate_masks_prompt_and_padding() -> None:
    batch = collate_for_training(_examples(), pad_id=0)
    assert batch["input_ids"].tolist()[1] == [9, 10, 11, 0, 0, 0]
    assert batch["labels"].tolist()[1] == [IGNORE_INDEX, 10, 11, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["labels"].tolist()[0] == [IGNORE_INDEX] * 3 + [8] + [IGNORE_INDEX] * 2
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 1, 0, 0]


def test_prompt_collate_pads_left() -> None:
    batch = collate_prompts_left_padded(_examples(), pad_id=0)
    assert batch["input_ids"].tolist()[1] == [0, 0, 0, 0, 9]
    assert batch["attention_mask"].tolist()[1] == [0, 0, 0, 0, 1]


def test_length_grouping_is_a_permutation_with_less_padding() -> None:
    import random

    lengths = [random.Random(i).randint(5, 80) for i in range(1000)]
    grouped = length_grouped_batches(lengths, 16, seed=1)
    plain = length_grouped_batches(lengths, 16, seed=1, group=False)
    for batches in (grouped, plain):
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(1000))

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5
    assert length_grouped_batches(lengths, 16, seed=2) != grouped  # reshuffled each epoch


def test_completion_loss_equals_the_full_model_loss() -> None:
    torch.manual_seed(0)
    config = {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 16, "vocab_size": 50,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    spec = ModelSpec(init="scratch", family="gpt2", config=config, weights=None, trust_remote_code=False,
                     quantization="none", vocab_size=50, n_positions=16, eos_token_id=0, pad_token_id=0)
    model = build_model(spec).eval()
    batch = collate_for_training(_examples(), pad_id=0)
    loss_sum, n = TokenLoss(model)(**batch)
    # Independent reference: transformers computes the shifted loss over all positions itself.
    reference = model(**batch).loss
    assert int(n) == 4
    torch.testing.assert_close(loss_sum / n, reference)


def test_classification_report_by_hand() -> None:
    gold = ["pos", "pos", "neg", "neu", "pos", "neg"]
    pred = ["pos", "neg", "neg", "pos", "pos", "xyz"]
    r = classification_report(gold, pred, ["neg", "neu", "pos"], majority="pos")
    assert r["accuracy"] == round(3 / 6, 4)
    assert r["majority_baseline"] == 0.5
    # pos: tp 2, predicted 3, support 3 -> p 2/3, r 2/3, f1 2/3
    assert r["per_class"]["pos"]["f1"] == round(2 / 3, 4)
    # neg: tp 1, predicted 2, support 2 -> p 0.5 r 0.5 f1 0.5 ; neu: 0
    assert r["per_class"]["neg"]["precision"] == 0.5
    assert r["macro_f1"] == round((2 / 3 + 0.5 + 0.0) / 3, 4)
    assert r["invalid_predictions"] == 1
    assert r["confusion"]["neg"] == {"neg": 1, "neu": 0, "pos": 0, "(other)": 1}


@pytest.mark.parametrize(("text", "word"), [(" positive", "positive"), ("  Negative.", "negative"),
                                             ("\nneutral stuff", "neutral"), ("", "")])
def test_first_word_extraction(text: str, word: str) -> None:
    assert extract_label(text, "first_word") == word


def test_runtime_refuses_other_schema_versions(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleBuildError, match="not a build directory"):
        load_runtime_config(tmp_path)
    (tmp_path / "runtime.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(IncompatibleBuildError, match="schema_version 999"):
        load_runtime_config(tmp_path)


def test_label_set_prediction_is_the_most_likely_label_sequence() -> None:
    """Checked against a direct computation: log-softmax of the full model output, summed over each
    label's tokens after the prompt, one example at a time."""
    from runtime.core.classify import predict_from_label_set

    torch.manual_seed(3)
    config = {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 16, "vocab_size": 50,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    spec = ModelSpec(init="scratch", family="gpt2", config=config, weights=None, trust_remote_code=False,
                     quantization="none", vocab_size=50, n_positions=16, eos_token_id=0, pad_token_id=0)
    model = build_model(spec).eval()
    candidates = {"a": [11, 12], "b": [13, 17], "c": [14, 15]}
    examples = [Encoded(prompt=tuple(range(1 + i, 4 + 2 * i)), completion=(), label="a", line=i) for i in range(6)]
    got = predict_from_label_set(model, examples, candidates, pad_id=0, batch_size=4)
    expected = []
    for e in examples:
        best, best_score = None, None
        for name, ids in candidates.items():
            full = torch.tensor([list(e.prompt) + ids])
            logp = torch.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)
            score = sum(float(logp[len(e.prompt) - 1 + k, t]) for k, t in enumerate(ids))
            if best_score is None or score > best_score:
                best, best_score = name, score
        expected.append(best)
    assert got == expected
    assert len(set(got)) > 1  # the case exercises more than one label


def test_epoch_grouping_takes_the_contracts_step_count_on_every_rank() -> None:
    """The runtime's batches of an epoch make exactly runtime.contract.steps.steps_per_epoch
    optimizer steps on every process: the count the plan shows."""
    from types import SimpleNamespace

    from runtime.contract.steps import steps_per_epoch
    from runtime.core.distributed import Dist
    from runtime.core.loop import epoch_groups

    checked = 0
    for n_rows in (1, 2, 3, 7, 10, 31, 64, 101):
        rows = [[0] * (1 + i % 5) for i in range(n_rows)]
        for micro_batch in (1, 2, 3, 8):
            for grad_accum in (1, 2, 3, 4):
                for world in (1, 2, 3, 4, 8):
                    stage = SimpleNamespace(micro_batch_size=micro_batch, grad_accum=grad_accum, length_grouping=True)
                    expected = steps_per_epoch(n_rows, micro_batch, grad_accum, world)
                    for rank in range(world):
                        d = Dist(rank=rank, world=world, local_rank=0)
                        groups = epoch_groups(rows, stage, seed=5, epoch=1, d=d)
                        assert len(groups) == expected, (n_rows, micro_batch, grad_accum, world, rank)
                        assert all(1 <= len(g) <= grad_accum for g in groups)
                    checked += 1
    assert checked == 8 * 4 * 4 * 5


def test_importing_evaluate_loads_no_training_code() -> None:
    import subprocess
    import sys

    code = ("import sys, runtime.evaluate; "
            "print(sorted(m for m in sys.modules if m == 'runtime.train' or m.startswith('runtime.stages')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_one_frozen_reference_rule_for_dpo_and_ppo() -> None:
    """A lora or prefix adapter on the weights the reference names: the policy with its adapter
    off (no model); otherwise a frozen copy."""
    from runtime.contract.config import AdapterSpec, load_runtime_config
    from runtime.core.reference import frozen_reference

    config = load_runtime_config(Path(__file__).resolve().parent / "golden" / "tweet-sentiment")
    torch.manual_seed(0)
    spec = ModelSpec(init="scratch", family="gpt2", config={"model_type": "gpt2", "n_embd": 16, "n_layer": 1,
                     "n_head": 2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, weights=None,
                     trust_remote_code=False, quantization="none", vocab_size=50, n_positions=16, eos_token_id=0,
                     pad_token_id=0)
    start = build_model(spec)
    run = SimpleNamespace(config=config)  # an fp32 build: the frozen copy keeps the start's dtype
    for kind in ("dpo", "ppo"):
        for adapter in ("lora", "prefix"):
            stage = config.stages[0].model_copy(update={"kind": kind, "start": "sft",
                                                        "adapter": AdapterSpec(kind=adapter)})
            assert frozen_reference(run, stage, start) is None
        stage = config.stages[0].model_copy(update={"kind": kind, "start": "sft", "adapter": AdapterSpec(kind="full")})
        reference = frozen_reference(run, stage, start)
        assert reference is not start and not reference.training
        assert not any(p.requires_grad for p in reference.parameters())
        assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), start.parameters()))


def test_an_adapter_of_matrices_only_gets_one_parameter_group() -> None:
    """No empty group: DeepSpeed's ZeRO optimizer drops one, and the scheduler would then step
    more groups than the optimizer holds."""
    from runtime.contract.config import AdapterSpec, StageSpec
    from runtime.core.optim import build_optimizer, build_scheduler

    stage = StageSpec(name="sft", kind="sft", data="d", start="base", adapter=AdapterSpec(kind="lora"), epochs=1,
                      max_steps=None, micro_batch_size=1, grad_accum=1, learning_rate=1e-2, lr_schedule="cosine",
                      warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0, optimizer="adamw", adam_betas=(0.9, 0.999),
                      adam_eps=1e-8, log_every_steps=1, eval_every_steps=None, save_every_steps=None,
                      keep_checkpoints=1, length_grouping=True, packing=False, momentum=0.9, report_to=(), params={},
                      cross_entropy="chunked", compile=False)
    matrices = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(2, 4, bias=False))
    optimizer = build_optimizer(matrices, stage)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1]
    assert len(build_scheduler(optimizer, stage, 10).get_last_lr()) == 1
    assert [g["weight_decay"] for g in build_optimizer(torch.nn.Linear(4, 2), stage).param_groups] == [0.1, 0.0]
