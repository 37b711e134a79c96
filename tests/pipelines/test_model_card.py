"""The model card is a pure function of its facts: the interval arithmetic, every section, honest limits."""

from __future__ import annotations

import re

import pytest

from pipelines.registry.model_card import (
    SECTIONS,
    DatasetFacts,
    ModelCard,
    RecipeFacts,
    card_summary,
    render_model_card,
    wilson_interval,
)


def _card(**changes) -> ModelCard:
    facts = dict(
        model_name="vit-demo",
        version="3",
        variant="Mu/8",
        parameters=203_338,
        image_size=32,
        resize_size=34,
        classes=[str(d) for d in range(10)],
        datasets=[
            DatasetFacts(role="pretraining", source="synth", shards="/w/shards/synth", fingerprint="abc123"),
            DatasetFacts(role="fine-tuning", source="digits", shards="/w/shards/digits", fingerprint="def456"),
        ],
        recipes=[
            RecipeFacts(
                stage="pretrain",
                steps=300,
                epochs=None,
                batch_size=128,
                optimizer="adamw",
                lr=0.002,
                weight_decay=0.1,
                schedule="linear",
                warmup_steps=30,
                image_size=32,
            ),
            RecipeFacts(
                stage="finetune",
                steps=500,
                epochs=None,
                batch_size=128,
                optimizer="sgd",
                lr=0.2,
                weight_decay=0.0,
                schedule="cosine",
                warmup_steps=50,
                image_size=32,
                resize_size=34,
            ),
        ],  # fmt: skip
        split="test",
        metrics={"eval/top1": 0.9, "eval/top5": 0.99, "eval/images": 100, "fewshot/10shot": 0.7, "fewshot/1shot": 0.3},
        top1_correct=90,
        lineage={"pipeline run": "p1", "fine-tuning run (this version's run)": "f1", "evaluation run": "e1"},
    )
    return ModelCard(**{**facts, **changes})


def test_the_wilson_interval_matches_the_textbook_case():
    low, high = wilson_interval(90, 100)
    assert low == pytest.approx(0.8256, abs=5e-4) and high == pytest.approx(0.9448, abs=5e-4)
    assert wilson_interval(0, 20)[0] == pytest.approx(0.0) and wilson_interval(20, 20)[1] == pytest.approx(1.0)
    assert wilson_interval(20, 20)[0] == pytest.approx(0.8389, abs=5e-4)  # not the degenerate [1, 1]
    narrow, wide = wilson_interval(900, 1000), wilson_interval(90, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_the_card_has_every_section_in_order_with_its_facts():
    text = render_model_card(_card())
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings == list(SECTIONS)
    assert text.startswith("# Model card: vit-demo version 3\n\n" + card_summary(_card()))
    assert "ViT-Mu/8" in text and "203,338" in text and "32px (resized to 34px" in text
    assert "`abc123`" in text and "`def456`" in text and "`synth`" in text  # data with fingerprints
    assert "| finetune | 500 steps | 128 | sgd | 0.2 | 0 | cosine | 50 | 32px (from 34px) |" in text
    assert "| eval/top1 | 90.00% | [82.6%, 94.5%] |" in text  # Wilson, from the exact count
    shots = re.findall(r"^\| (\d+) \| ([\d.]+%) \|", text, re.MULTILINE)
    assert shots == [("1", "30.00%"), ("10", "70.00%")]  # sorted by shot count, not by name
    assert "- pipeline run: `p1`" in text and "- evaluation run: `e1`" in text
    assert "not meant to classify anything for real" in text  # the toy demo says what it is
    assert "synthetic corpus" in text and "1,797 8x8" in text and "Pretraining ran for only 300 steps" in text
    assert "only 100 images" in text and "11.9 points wide" in text


def test_the_summary_is_one_paragraph_with_the_headline_interval():
    summary = card_summary(_card())
    assert "\n" not in summary and summary.startswith("ViT-Mu/8 (203,338 parameters, 32px) classifying 10 classes")
    assert "Top-1 90.0% (95% interval [82.6%, 94.5%]) on 100 test images" in summary
    assert "fingerprint abc123" in summary and "toy-scale" in summary


def test_a_card_for_real_data_and_no_top1_evaluation_says_so():
    card = _card(
        datasets=[DatasetFacts(role="fine-tuning", source="s3://b/flowers", shards="s3://b/s", fingerprint=None)],
        recipes=[_card().recipes[1].__class__(**{**vars(_card().recipes[1]), "steps": 20_000})],
        metrics={"fewshot/5shot": 0.5},
        top1_correct=None,
    )
    text = render_model_card(card)
    assert re.findall(r"^## (.+)$", text, re.MULTILINE) == list(SECTIONS)
    assert "toy" not in card_summary(card) and "Classifying images into the 10 classes" in text
    assert "No top-1 evaluation" in text and "| 5 | 50.00% | - |" in text  # no image count: no interval
    assert "synthetic" not in text and "only 20,000 steps" not in text


def test_the_card_points_to_the_inspection_beside_it_when_there_is_one():
    paths = ["inspection/attention_rollout.png", "inspection/filters.png", "inspection/inspection.html"]
    text = render_model_card(_card(inspection=[*paths, "inspection/inspection.json"]))
    model = text.split("## Model\n")[1].split("\n## ")[0]
    line = next(line for line in model.splitlines() if "What it learned" in line)
    assert "Figs. 6 and 7" in line and "held-out test images" in line
    assert "`inspection/inspection.html` (one self-contained page)" in line
    assert "`inspection/filters.png`" in line and "`inspection/inspection.json`" in line
    assert "What it learned" not in render_model_card(_card())  # none logged (an older version): no line


def test_the_card_compares_the_pretrained_features_with_random_ones_when_both_were_measured():
    transfer = {"pretrained/fewshot/5shot": 0.51, "random_init/fewshot/5shot": 0.38, "pretrained/fewshot/1shot": 0.37}
    text = render_model_card(_card(metrics={**_card().metrics, **transfer}))
    assert "| 5 | 51.00% | 38.00% | +13.00% |" in text  # a shot count needs both figures: 1-shot has one
    assert "| 1 | 37.00%" not in text
    shots = re.findall(r"^\| (\d+) \| ([\d.]+%) \| \[", text, re.MULTILINE)
    assert shots == [("1", "30.00%"), ("10", "70.00%")]  # the model's own probes are not mixed with them
    assert "What the pretraining transferred" not in render_model_card(_card())
