"""`vit inspect`: a tiny checkpoint in, the paper's analysis figures, their numbers and one self-contained page out."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import vit
from pipelines.cli import main
from pipelines.evaluation.inspect import FIGURES, load_inspected_model

TINY = dict(img_size=32, patch_size=8, width=48, depth=2, num_heads=4, mlp_dim=96, num_classes=5)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """A tiny model on a shared 2-core machine: intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _checkpoint(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    vit.save_checkpoint(vit.VisionTransformer(vit.ViTConfig(**{**TINY, **overrides})), folder / "model.safetensors")
    return folder


def _inspect(*args: str):
    return CliRunner().invoke(main, ["inspect", *args])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """`vit inspect CHECKPOINT_FOLDER --out DIR` without images: scikit-learn's sample photographs stand in."""
    root = tmp_path_factory.mktemp("inspect")
    result = _inspect(str(_checkpoint(root / "checkpoint-000010")), "--out", str(root / "report"))
    assert result.exit_code == 0, result.output
    return root / "report"


def test_every_figure_is_a_png(report):
    for name in FIGURES.values():
        with Image.open(report / name) as image:
            assert image.format == "PNG"
            assert image.width > 100 and image.height > 100
            image.verify()


def test_the_json_holds_the_numbers_in_their_shapes(report):
    data = json.loads((report / "inspection.json").read_text())
    model = data["model"]
    assert (model["image_size"], model["patch_size"], model["grid"], model["pool"]) == (32, 8, [4, 4], "cls")
    assert model["config"]["width"] == 48 and model["parameters"] > 0
    assert model["source"].endswith("model.safetensors")

    ratio = data["filters"]["explained_variance_ratio"]
    assert data["filters"]["components"] == len(ratio) == 28
    assert all(a >= b for a, b in zip(ratio, ratio[1:])) and sum(ratio) <= 1 + 1e-6

    similarity = np.array(data["position_embeddings"]["similarity"])
    assert similarity.shape == (16, 16)
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-5)
    np.testing.assert_allclose(similarity, similarity.T, atol=1e-5)

    distances = np.array(data["attention_distance"]["distances"])
    assert distances.shape == (2, 4)  # depth x heads
    assert ((distances >= 0) & (distances <= 32 * 2**0.5)).all()

    assert data["images"]["sample_images"] and data["images"]["names"] == ["china.jpg", "flower.jpg"]
    assert any("load_sample_images" in note for note in data["notes"])
    maps = data["attention_rollout"]["maps"]
    assert [m["image"] for m in maps] == ["china.jpg", "flower.jpg"]
    for m in maps:
        grid = np.array(m["map"])
        assert grid.shape == (4, 4) and (grid >= 0).all()
        assert grid.sum() == pytest.approx(1.0, abs=1e-4)
    assert data["figures"] == FIGURES


def test_the_page_embeds_every_figure_and_loads_nothing_else(report):
    page = (report / "inspection.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(FIGURES)
    for name, data in zip(FIGURES.values(), embedded):
        assert base64.b64decode(data) == (report / name).read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external resources
    assert "model.safetensors" in page and "32x32 px" in page


def test_a_hybrid_gap_model_on_given_images_leaves_out_filters_and_rollout(tmp_path):
    checkpoint = _checkpoint(tmp_path / "hybrid", img_size=64, patch_size=1, resnet_layers=(1, 1), pool="gap")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    single = tmp_path / "c.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(single)

    result = _inspect(str(checkpoint / "model.safetensors"), str(folder), str(single), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "inspection.json").read_text())
    assert data["model"]["hybrid"] and data["filters"] is None and data["attention_rollout"] is None
    assert data["images"]["names"] == ["a.png", "b.png", "c.png"] and not data["images"]["sample_images"]
    assert np.array(data["attention_distance"]["distances"]).shape == (2, 4)
    notes = " ".join(data["notes"])
    assert "stem" in notes and "not pixels" in notes and "pool='gap'" in notes
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["attention_distance.png", "inspection.html", "inspection.json", "position_embeddings.png"]
    page = (tmp_path / "out" / "inspection.html").read_text()
    assert "not pixels" in page and page.count("data:image/png;base64,") == 2


def test_a_registered_model_is_the_pyfunc_s_own_network(monkeypatch):
    network = vit.VisionTransformer(vit.ViTConfig(**TINY)).train()

    class Loaded:
        def unwrap_python_model(self):
            return type("Classifier", (), {"model": network})()

    seen = []
    monkeypatch.setattr("pipelines.registry.predict.load_pyfunc", lambda uri: seen.append(uri) or Loaded())
    model, source = load_inspected_model("models:/vit-digits@champion")
    assert model is network and not model.training
    assert seen == [source] == ["models:/vit-digits@champion"]


def test_a_missing_model_is_a_user_error(tmp_path):
    result = _inspect(str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    result = _inspect(str(_checkpoint(tmp_path / "ck")), str(tmp_path / "no.png"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "no such file" in result.output


def test_an_undecodable_image_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = _inspect(str(_checkpoint(tmp_path / "ck")), str(bad), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "bad.png" in result.output, result.output
