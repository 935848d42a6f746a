"""Student architecture, layer-map initialisation and the hidden-state map."""

from __future__ import annotations

import json

import pytest
import torch

from kdpipe.pipeline import student as stu
from kdpipe.pipeline.errors import KdpipeError


def teacher_config(layers: int = 4, hidden: int = 32) -> dict:
    from transformers import BertConfig

    return BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=64).to_dict()


@pytest.fixture(scope="module")
def teacher4() -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(123)
    return BertForMaskedLM(BertConfig(**{k: v for k, v in teacher_config().items()
                                         if k != "model_type"})).eval()


def test_default_layer_map_is_every_other_layer():
    assert stu.default_layer_map(6, 3) == [0, 2, 4]
    assert stu.default_layer_map(12, 6) == [0, 2, 4, 6, 8, 10]
    assert stu.default_layer_map(2, 1) == [0]
    assert stu.default_layer_map(4, 4) == [0, 1, 2, 3]


def test_layer_map_problems_name_the_missing_layers():
    assert stu.check_layer_map([0, 2], 4, 2) == []
    problems = stu.check_layer_map([0, 7], 4, 2)
    assert len(problems) == 1 and "7" in problems[0] and "4 layers" in problems[0]
    assert "2 entries" in stu.check_layer_map([0, 1], 4, 3)[0]


def test_student_config_defaults_to_half_the_teacher():
    cfg = stu.student_config(teacher_config(4))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size) == (2, 32, 2, 50)
    cfg = stu.student_config(teacher_config(4), layers=3, hidden=16, heads=4)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (3, 16, 4, 32)
    cfg = stu.student_config(teacher_config(4), override={"vocab_size": 77, "num_hidden_layers": 3})
    assert (cfg.vocab_size, cfg.num_hidden_layers) == (77, 3)
    with pytest.raises(KdpipeError, match="multiple"):
        stu.student_config(teacher_config(4), hidden=30, heads=4)


def test_init_copies_exactly_the_mapped_layers_embeddings_and_head(teacher4):
    cfg = stu.student_config(teacher_config(4))
    student = stu.build_student(cfg, seed=0)
    report = stu.init_from_teacher(student, teacher4.state_dict(), [1, 3])
    t, s = teacher4.state_dict(), student.state_dict()
    for name, v in s.items():
        if ".layer." in name:
            j = int(name.split(".layer.")[1].split(".")[0])
            src = name.replace(f".layer.{j}.", f".layer.{[1, 3][j]}.")
        else:
            src = name
        assert torch.equal(v, t[src]), name
    assert report.kept_random == [] and len(report.copied) == len(s)
    # and the student layer 0 is not teacher layer 0 (the map was followed, not the index)
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(s[w], t[w])


def test_random_init_copies_nothing_and_is_seeded(teacher4):
    cfg = stu.student_config(teacher_config(4))
    a, b = stu.build_student(cfg, seed=5), stu.build_student(cfg, seed=5)
    c = stu.build_student(cfg, seed=6)
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], teacher4.state_dict()[w])


def test_init_keeps_random_what_does_not_fit_and_refuses_layers_that_do_not(teacher4):
    cfg = stu.student_config(teacher_config(4), override={"max_position_embeddings": 32})
    student = stu.build_student(cfg, seed=0)
    report = stu.init_from_teacher(student, teacher4.state_dict(), [0, 2])
    assert report.kept_random == ["bert.embeddings.position_embeddings.weight"]
    narrow = stu.build_student(stu.student_config(teacher_config(4), hidden=16), seed=0)
    with pytest.raises(KdpipeError, match="--init random"):
        stu.init_from_teacher(narrow, teacher4.state_dict(), [0, 2])


def test_hidden_map_uses_the_cache_projection_where_widths_match():
    proj = torch.randn(32, 8)
    same = stu.hidden_map(32, 32, proj)
    h = torch.randn(5, 32)
    assert torch.allclose(same(h), h @ proj)
    assert list(same.parameters()) == []  # fixed: not trained
    learned = stu.hidden_map(16, 32, proj)
    assert isinstance(learned, torch.nn.Linear) and learned(torch.randn(5, 16)).shape == (5, 8)


def test_vocab_mismatch_names_both_sizes():
    with pytest.raises(KdpipeError, match="77.*50"):
        stu.check_vocab(77, 50)


def test_student_saves_and_loads_without_kdpipe(tmp_path, teacher4):
    from transformers import AutoModelForMaskedLM

    student = stu.build_student(stu.student_config(teacher_config(4)), seed=0)
    student.save_pretrained(tmp_path / "s")
    back = AutoModelForMaskedLM.from_pretrained(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 2
    for (n, a), b in zip(student.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n
