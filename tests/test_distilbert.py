"""A DistilBERT student from a BERT teacher: the name map, training from a cache, loading with
plain transformers, and eval beside a BERT-shaped student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kdpipe.pipeline import student as stu
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.stages.student_train import StudentConfig, main


def bert(layers: int = 4, hidden: int = 32, seed: int = 123) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=64, hidden_act="gelu")
    model = BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # BertForMaskedLM inits the head bias at 0 and a LayerNorm at (1, 0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def distil(teacher: torch.nn.Module, layer_map: list[int], **kw) -> torch.nn.Module:
    cfg = stu.student_config(teacher.config.to_dict(), layers=len(layer_map), arch="distilbert", **kw)
    model = stu.build_student(cfg, seed=0)
    stu.init_from_teacher(model, teacher.state_dict(), layer_map)
    return model.eval()


def test_a_distilbert_with_every_teacher_layer_computes_the_teachers_logits():
    teacher = bert()
    student = distil(teacher, [0, 1, 2, 3])
    assert type(student).__name__ == "DistilBertForMaskedLM"
    ids = torch.randint(5, 50, (3, 12))
    att = torch.ones_like(ids)
    att[1, 8:] = 0
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=att).logits  # (B, T, V)
        zs = student(input_ids=ids, attention_mask=att).logits
        # the kdpipe view of the student (body, then the head as one module) is the same model
        zk = stu.mlm_head(student)(stu.body(student)(input_ids=ids, attention_mask=att)[0])
    assert torch.allclose(zs, zt, atol=1e-5) and torch.equal(zk, zs)
    # the token-type row is folded into the positions: dropping it (as the reference script does)
    # would change what the student computes
    pos = "distilbert.embeddings.position_embeddings.weight"
    tt = teacher.state_dict()["bert.embeddings.token_type_embeddings.weight"][0]
    assert torch.allclose(student.state_dict()[pos], teacher.state_dict()["bert.embeddings.position_embeddings.weight"] + tt)


def test_a_layer_map_copies_the_named_teacher_layers():
    teacher = bert()
    student = distil(teacher, [3, 1])
    t, s = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([3, 1]):
        for mine, theirs in (("attention.q_lin", "attention.self.query"), ("ffn.lin2", "output.dense"),
                             ("output_layer_norm", "output.LayerNorm")):
            for leaf in ("weight", "bias"):
                assert torch.equal(s[f"distilbert.transformer.layer.{j}.{mine}.{leaf}"],
                                   t[f"bert.encoder.layer.{i}.{theirs}.{leaf}"])
    assert torch.equal(s["vocab_transform.weight"], t["cls.predictions.transform.dense.weight"])
    assert torch.equal(s["vocab_projector.bias"], t["cls.predictions.bias"])


def test_distilbert_config_names_and_refusals():
    cfg = stu.student_config(bert().config.to_dict(), arch="distilbert", hidden=16, heads=4)
    assert (cfg.model_type, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.hidden_dim) == ("distilbert", 2, 16, 4, 32)
    # a --student-config with model_type distilbert asks for the same
    cfg = stu.student_config(bert().config.to_dict(), override={"model_type": "distilbert", "n_layers": 3})
    assert (cfg.model_type, cfg.n_layers, cfg.dim) == ("distilbert", 3, 32)
    from transformers import RobertaConfig

    with pytest.raises(KdpipeError, match="BERT teacher"):
        stu.student_config(RobertaConfig(vocab_size=50).to_dict(), arch="distilbert")
    with pytest.raises(KdpipeError, match="model_type 'bert'"):
        stu.student_config(bert().config.to_dict(), override={"model_type": "bert"}, arch="distilbert")
    narrow = stu.build_student(stu.student_config(bert().config.to_dict(), arch="distilbert", hidden=16), 0)
    with pytest.raises(KdpipeError, match="--init random"):
        stu.init_from_teacher(narrow, bert().state_dict(), [0, 2])


@pytest.fixture(scope="module")
def distil_run(tmp_path_factory, reference_cache) -> Path:
    out = tmp_path_factory.mktemp("distil") / "run"
    main(StudentConfig(cache=str(reference_cache), out=str(out), student_arch="distilbert", temperature=1.5,
                       max_steps=6, batch_size=8, save_every=3, log_every=1))
    return out


def test_a_distilbert_student_trains_and_loads_as_plain_transformers(distil_run, teacher_dir):
    from transformers import (AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DistilBertForMaskedLM, pipeline)

    final = distil_run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["architectures"] == ["DistilBertForMaskedLM"]
    record = json.loads((distil_run / "run.json").read_text())
    assert record["init"]["layer_map"] == [0] and record["init"]["kept_random"] == []
    lines = [json.loads(x) for x in (distil_run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(m["loss_ce"] > 0 and m["loss_cos"] > 0 for m in lines)

    m = DistilBertForMaskedLM.from_pretrained(final)
    auto = AutoModelForMaskedLM.from_pretrained(final)
    assert type(auto) is DistilBertForMaskedLM
    for (n, a), b in zip(m.state_dict().items(), auto.state_dict().values()):
        assert torch.equal(a, b), n
    tok = AutoTokenizer.from_pretrained(final)
    enc = tok("the film was great", return_tensors="pt")
    assert "token_type_ids" not in enc  # DistilBERT takes none
    clf = AutoModelForSequenceClassification.from_pretrained(final, num_labels=3)
    assert type(clf).__name__ == "DistilBertForSequenceClassification"
    with torch.no_grad():
        assert clf(**enc).logits.shape == (1, 3)
    fill = pipeline("fill-mask", model=str(final), top_k=3)
    out = fill("the [MASK] was great")
    assert len(out) == 3 and all(0 <= r["score"] <= 1 and r["sequence"].startswith("the") for r in out)


def test_the_final_folder_has_a_model_card(distil_run, reference_cache):
    card = (distil_run / "final" / "README.md").read_text()
    manifest = json.loads((reference_cache / "manifest.json").read_text())
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: fill-mask" in front and "- distilbert" in front
    for needle in ("# DistilBertForMaskedLM distilled with kdpipe", manifest["fingerprint_sha256"],
                   manifest["fingerprint"]["teacher"]["weights_sha256"], "5.0 · L_ce + 2.0 · L_mlm + 1.0 · L_cos",
                   "| temperature | 1.5 |", "teacher layers [0]", "6 (", "No `kdpipe eval` report"):
        assert needle in card, needle


def test_a_distilbert_run_resumes_bit_identically(distil_run, reference_cache, tmp_path):
    run = Path(shutil.copytree(distil_run, tmp_path / "run"))
    shutil.rmtree(run / "final")  # as if killed after its checkpoint at step 3
    ckpts = run / "checkpoints"
    for p in ckpts.iterdir():
        if p.is_dir() and not p.name.endswith("3"):
            shutil.rmtree(p)
    (ckpts / "latest").write_text(next(p.name for p in ckpts.iterdir() if p.is_dir()) + "\n")
    summary = main(StudentConfig(cache=str(reference_cache), out=str(run), student_arch="distilbert",
                                 temperature=1.5, max_steps=6, batch_size=8, save_every=3, log_every=1))
    assert summary["status"] == "resumed"
    assert (run / "final" / "model.safetensors").read_bytes() == \
        (distil_run / "final" / "model.safetensors").read_bytes()


def test_eval_measures_a_distilbert_beside_a_bert_student(distil_run, reference_cache, teacher_dir, tmp_path):
    from click.testing import CliRunner

    from helpers import tiny_corpus
    from kdpipe.pipeline.cli import cli
    from kdpipe.schemas.report import Report

    bert_run = tmp_path / "bert"
    main(StudentConfig(cache=str(reference_cache), out=str(bert_run), temperature=1.5, max_steps=6,
                       batch_size=8, save_every=100))
    tiny_corpus(tmp_path / "heldout.txt", lines=20, seed=7)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"text": f"the film {w}", "label": w in ("great", "light")}) + "\n"
                            for w in ["great", "war", "light", "old"] * 8))
    r = CliRunner().invoke(cli, [
        "eval", "--teacher", str(teacher_dir), "--student", f"bert={bert_run}", "--student", f"distil={distil_run}",
        "--heldout", str(tmp_path / "heldout.txt"), "--task", str(task), "--out", str(tmp_path / "report"),
        "--seeds", "1", "--epochs", "1", "--batch-size", "8", "--seq-len", "32", "--heldout-sequences", "8",
        "--speed-repeats", "2", "--speed-warmup", "1", "--speed-batch-size", "2", "--speed-seq-len", "16"])
    assert r.exit_code == 0, (r.output, r.exception)
    report = Report.model_validate_json((tmp_path / "report" / "report.json").read_text())
    models = {m.name: m for m in report.models}
    assert models["distil"].architecture == "DistilBertForMaskedLM"
    assert models["bert"].architecture == "BertForMaskedLM"
    # same layers and width; DistilBERT has no token-type embeddings and no pooler
    assert (models["distil"].layers, models["distil"].hidden_size) == (models["bert"].layers, models["bert"].hidden_size)
    assert models["distil"].parameters < models["bert"].parameters
    speed = {x.model: x for x in report.speed.results}
    mlm = {x.model: x for x in report.mlm.results}
    (t,) = report.tasks
    acc = {x.model: x for x in t.results}
    for name in ("bert", "distil"):
        assert speed[name].latency_ms.median > 0 and 0 <= mlm[name].top1_accuracy <= 1
        assert 0 <= acc[name].accuracy.median <= 1
    assert "| distil | student | DistilBertForMaskedLM |" in (tmp_path / "report" / "report.md").read_text()
    # eval filled in the evaluation section of both students' model cards
    assert sorted(json.loads(r.stdout)["model_cards"]) == sorted(
        str(p.resolve() / "final" / "README.md") for p in (bert_run, distil_run))
    card = (distil_run / "final" / "README.md").read_text()
    assert "No `kdpipe eval` report" not in card
    assert f"top-1 {100 * mlm['distil'].top1_accuracy:.1f}%" in card
    assert f"dev accuracy {100 * acc['distil'].accuracy.median:.1f}%" in card and "ms at batch 1" in card
