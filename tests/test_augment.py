"""Augmented copies for task distillation: the teacher's masked-LM guesses, deterministic per copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdpipe.pipeline import augment
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.teacher import load_masked_lm

TEXTS = ["the film was great and light", "an old war story told badly", "light rain over the old town",
         "great", "a story of war and a great light in the town"]


@pytest.fixture(scope="module")
def mlm(teacher_dir: Path) -> torch.nn.Module:
    return load_masked_lm(str(teacher_dir))[0]


def test_copies_are_a_pure_function_of_seed_example_and_copy(mlm, tokenizer) -> None:
    copies = augment.sources([4, 0, 2, 1, 3], 12)
    assert copies[:6] == [(4, 0), (0, 0), (2, 0), (1, 0), (3, 0), (4, 1)] and copies[-1] == (0, 2)
    cpu = torch.device("cpu")
    run = lambda cs, seed=0: augment.augment(mlm, tokenizer, TEXTS, cs, seed, 32, cpu)  # noqa: E731
    together = run(copies)
    assert together == run(copies)  # deterministic
    assert together == [run([c])[0] for c in copies]  # whatever the batch it is made in
    assert run(copies, seed=1) != together
    for (example, _), text in zip(copies, together):
        assert text != TEXTS[example]  # at least one piece re-guessed
        assert "[MASK]" not in text and "[CLS]" not in text and "[SEP]" not in text and "[PAD]" not in text
        assert abs(len(text.split()) - len(TEXTS[example].split())) <= len(TEXTS[example].split())
    assert together[0] != together[5]  # two copies of one example differ


def test_every_piece_replaced_at_rate_one_never_by_itself(mlm, tokenizer) -> None:
    enc = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    (text,) = augment.augment(mlm, tokenizer, TEXTS, [(0, 0)], 0, 32, torch.device("cpu"), rate=1.0)
    new = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(new) == len(enc):  # decoding may merge pieces; where it does not, none is the original
        assert all(a != b for a, b in zip(new, enc))


def test_no_training_examples_no_copies() -> None:
    assert augment.sources([], 0) == []
    with pytest.raises(KdpipeError, match="training examples"):
        augment.sources([], 3)
