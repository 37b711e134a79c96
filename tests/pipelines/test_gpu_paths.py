"""The code paths a GPU run takes, run on CPU against the plain path they stand in for: bf16 autocast in the worker's
step and FSDP2's mixed-precision policy against fp32, activation checkpointing against none, compiled blocks against
eager ones (``pipelines.training.parallel``); the registered model's choice of device and precision; evaluation in a
Ray task that holds a GPU (one declared to Ray: the task finds no CUDA and scores on its CPU).

Two tests run this file as a script in a subprocess: ``ranks`` spawns two gloo ranks (``torch.multiprocessing``,
whose ranks import their function by the file's path), ``ray`` starts a local Ray with a GPU of its own, away from
the session's shared one. Each writes what it found to JSON files, which the test reads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 10
# head_zero_init false: the paper's zero head gives every image the loss ln(10), whatever the precision.
SETTINGS = [
    "model=Mu/8",
    "data.image_size=32",
    "batch_size=8",
    "steps=4",
    "optim.warmup_steps=0",
    "model_args={dropout: 0.0, head_zero_init: false}",
]
LR = 0.1
# SGD without momentum or decay, on its first step, moves the weights by -LR * gradient: updates compare as the
# gradients do. (Adam's first update, about LR * sign(gradient), would turn bf16 noise on tiny gradients into +-LR.)

# bf16 keeps 8 bits of mantissa (rounding 2**-9 = 0.2% relative); through the layers of this tiny ViT its gradients
# drift from fp32's by a few percent (measured, as a norm over all of them: 2.2% under DDP's autocast, 2.4% under
# FSDP's policy, which also casts the norms' and embeddings' weights; 2.7% between the two). 6% passes that and fails
# on a missing cast or a lost micro-batch (50%); more than 0.1% shows that bf16 was computed in at all.
BF16_RTOL, BF16_SEEN = 0.06, 1e-3


# ---------------------------------------------------------------------------------------------- on each rank


def _rank_main(rank: int, world: int, port: int, folder: str) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        facts = {f"bf16 {s}": _bf16_against_fp32(rank, world, s) for s in ("ddp", "fsdp")}
        facts |= {f"checkpointing {s}": _checkpointing_against_none(rank, world, s) for s in ("ddp", "fsdp")}
        facts["compile fsdp"] = _compiled_against_eager(rank, world)
    finally:
        dist.destroy_process_group()
    Path(folder, f"rank-{rank}.json").write_text(json.dumps(facts))


def _config(*extra: str):
    from pipelines.training.config import load_train_config

    return load_train_config("pretrain", None, [*SETTINGS, *extra])


def _batch(size: int = 32):
    import torch

    generator = torch.Generator().manual_seed(3)
    images = torch.randn(8, 3, size, size, generator=generator)
    return images, torch.randint(0, NUM_CLASSES, (8,), generator=generator)


def _my_micro_batches(rank: int, world: int, size: int = 32) -> list:
    """This rank's share of the global batch, as two micro-batches (the second reduces across ranks)."""
    images, targets = _batch(size)
    mine = images.chunk(world)[rank], targets.chunk(world)[rank]
    return list(zip(mine[0].chunk(2), mine[1].chunk(2)))


def _spread(cfg, rank: int, world: int):
    import torch

    from pipelines.training.parallel import spread_model

    torch.manual_seed(0)
    return spread_model(cfg, NUM_CLASSES, False, rank=rank, world=world, device=torch.device("cpu"))


def _whole(cfg):
    """The plain path: the whole model on this CPU from the same seed (``spread_model`` draws the same weights)."""
    import torch

    from pipelines.training.weights import build_model

    torch.manual_seed(0)
    return build_model(cfg, NUM_CLASSES, False)


def _full(tensor):
    """A DTensor's whole value (every rank must ask: a collective), a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _step(model, wrapped, micro_batches, **hooks) -> dict:
    """``vit.train.train_step`` with SGD at ``LR`` and no clipping: its figures, the whole gradients as they were
    before the update (with their dtype), and the whole weights before and after."""
    import torch

    from vit.train import train_step

    grads: dict = {}

    def keep_gradients() -> None:
        for name, p in model.named_parameters():
            grads[name] = _full(p.grad).detach().clone()
            grads[name + ":dtype"] = str(p.grad.dtype)

    before = {n: _full(p).detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    metrics = train_step(
        wrapped,
        optimizer,
        lr=LR,
        grad_clip_norm=None,
        micro_batches=micro_batches,
        before_update=keep_gradients,
        **hooks,
    )
    return {
        "metrics": metrics,
        "grads": {k: v for k, v in grads.items() if not k.endswith(":dtype")},
        "grad_dtypes": sorted({v for k, v in grads.items() if k.endswith(":dtype")}),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "update": {n: _full(p).detach() - before[n] for n, p in model.named_parameters()},
    }


def _starts(module) -> list:
    """A list that grows each time ``module``'s forward starts. A pre-hook: a recomputation in backward stops as
    soon as it has what backward needs, which can be before the module's own end."""
    starts: list = []
    module.register_forward_pre_hook(lambda *_: starts.append(1))
    return starts


def _outputs(module) -> list:
    """A list that gets each output of ``module``."""
    outputs: list = []
    module.register_forward_hook(lambda _module, _args, out: outputs.append(out.detach()))
    return outputs


def _relative(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all the tensors of two name -> tensor dicts."""
    import torch

    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in b)
    den = sum((b[k].double() ** 2).sum() for k in b)
    return torch.sqrt(num / den).item()


def _bf16_against_fp32(rank: int, world: int, strategy: str) -> dict:
    """A worker's bf16 step (``scale.precision=bf16``: autocast, and under FSDP its mixed-precision policy too) on
    each rank's half of a global batch, two micro-batches each; against the whole model's step on the whole batch,
    in fp32 and in the same autocast without sharding."""
    import torch

    parallel = _spread(_config(f"scale.strategy={strategy}", "scale.precision=bf16"), rank, world)
    seen = {}

    def record(module, args, output):  # what the layer computed with, and in, inside the worker's step
        seen.update(weight=str(module.weight.dtype), output=str(output.dtype))

    hook = parallel.model.blocks[0].mlp.fc1.register_forward_hook(record)
    ours = _step(
        parallel.model,
        parallel.wrapped,
        _my_micro_batches(rank, world),
        no_sync=parallel.no_sync,
        autocast=parallel.autocast,
    )
    hook.remove()
    facts = {
        "strategy": parallel.strategy,
        "bf16": parallel.bf16,
        "seen": seen,
        "param_dtypes": ours["param_dtypes"],  # the master weights ...
        "grad_dtypes": ours["grad_dtypes"],  # ... and the gradients applied to them
        "grad_norm": ours["metrics"]["train/grad_norm"],
        "loss": ours["metrics"]["train/loss"],  # of this rank's half of the batch
    }
    if rank != 0:
        return facts
    images, targets = _batch()
    fp32_cfg = _config(f"scale.strategy={strategy}", "scale.precision=fp32")
    fp32 = _whole(fp32_cfg)
    plain = _step(fp32, fp32, [(images, targets)])
    whole = _whole(fp32_cfg)
    autocast = _step(whole, whole, [(images, targets)], autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    return {
        **facts,
        "fp32_loss": plain["metrics"]["train/loss"],
        "grads_vs_fp32": _relative(ours["grads"], plain["grads"]),
        "grads_vs_autocast": _relative(ours["grads"], autocast["grads"]),
        "update_vs_fp32": _relative(ours["update"], plain["update"]),
        "update_vs_autocast": _relative(ours["update"], autocast["update"]),
    }


def _checkpointing_against_none(rank: int, world: int, strategy: str) -> dict:
    """The same fp32 step with and without ``scale.activation_checkpointing``: how often a block's MLP started
    (a recomputation starts it again in backward) and the largest gradient difference."""
    steps = {}
    for checkpointing in (False, True):
        cfg = _config(f"scale.strategy={strategy}", f"scale.activation_checkpointing={checkpointing}")
        parallel = _spread(cfg, rank, world)
        starts = _starts(parallel.model.blocks[1].mlp)
        micro_batches = _my_micro_batches(rank, world)
        step = _step(parallel.model, parallel.wrapped, micro_batches, no_sync=parallel.no_sync)
        steps[checkpointing] = (len(starts), step)
    (starts_plain, plain), (starts_checkpointed, checkpointed) = steps[False], steps[True]
    return {
        "mlp_starts": [starts_plain, starts_checkpointed],
        "max_grad_difference": max(
            (checkpointed["grads"][k] - g).abs().max().item() for k, g in plain["grads"].items()
        ),
        "max_grad": max(g.abs().max().item() for g in plain["grads"].values()),
    }


def _compiled_against_eager(rank: int, world: int) -> dict:
    """``scale.compile`` under FSDP2: the blocks compiled before they are sharded, as ``spread_model`` does, train
    like eager ones. With the ``aot_eager`` backend: what FSDP meets is Dynamo's tracing (its hooks are left out of
    the graph), the same whatever the backend; Inductor's kernels are checked in one process
    (``test_compiled_blocks_compute_what_eager_ones_do``), where they cost one compilation instead of two at once."""
    import torch
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, *a, **kw: compile_module(self, *a, **{"backend": "aot_eager", **kw})
    try:
        steps = {}
        for compiled in (False, True):
            parallel = _spread(_config("scale.strategy=fsdp", f"scale.compile={compiled}"), rank, world)
            micro_batches = _my_micro_batches(rank, world)
            steps[compiled] = _step(parallel.model, parallel.wrapped, micro_batches, no_sync=parallel.no_sync)
    finally:
        torch.nn.Module.compile = compile_module
    return {
        "compiled": all(block._compiled_call_impl is not None for block in parallel.model.blocks),
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "max_grad_difference": max(
            (steps[True]["grads"][k] - g).abs().max().item() for k, g in steps[False]["grads"].items()
        ),
    }


# ---------------------------------------------------------------------------------------------- in a Ray


def _ray_main(folder: str) -> None:
    """``evaluate_on_cluster`` without Ray (here), then with a local Ray that declares one GPU (in a task)."""
    import ray

    from pipelines.evaluation.evaluate import EvaluateConfig, evaluate_on_cluster

    cfg = EvaluateConfig(**_eval_set(Path(folder)), batch_size=8, loader_workers=0, shots=[1], fewshot_val_per_class=1)
    found = {"driver_pid": os.getpid()}
    for where in ("driver", "task"):
        if where == "task":
            ray.init(
                address="local",
                num_cpus=2,
                num_gpus=1,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        details, lines = {}, []
        metrics = evaluate_on_cluster(cfg, lines.append, details=details)
        found[where] = {
            "metrics": {k: v for k, v in metrics.items() if k != "eval/seconds"},
            "labels": details["labels"].tolist(),
            "top1_correct": details["top1_correct"].tolist(),
            "confusion": details["confusion"].tolist(),
            "worker": details.get("worker"),
            "lines": lines,
        }
    ray.shutdown()
    Path(folder, "ray.json").write_text(json.dumps(found))


def _label(index: int, classes: int) -> int:
    """Runs of 5 images per class: no period that a batch's offset in the stream could share."""
    return index // 5 % classes


def _eval_set(root: Path, *, samples: int = 24, classes: int = 3) -> dict:
    """A tiny model (Mu/8 at 16 px, a non-zero head) and a `vit shard`-style set of random 16 px images with
    ``test`` and ``train`` splits: the ``model`` and ``shards`` of an ``EvaluateConfig``."""
    import io

    import torch
    from PIL import Image

    import vit

    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("test", "train"):
        name = f"{split}-000000.tar"
        with tarfile.open(shards / name, "w") as tar:
            for i in range(samples):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
                label = json.dumps({"label_ids": [_label(i, classes)]}).encode()
                for member, data in ((f"{split}{i:04d}.png", buffer.getvalue()), (f"{split}{i:04d}.json", label)):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        splits[split] = {"name": split, "num_samples": samples, "filenames": [name], "shard_lengths": [samples]}
    info = {"name": "tiny", "num_classes": classes, "multi_label": False, "splits": splits}
    (shards / "_info.json").write_text(json.dumps(info))
    torch.manual_seed(0)
    model = vit.create_model("Mu/8", img_size=16, num_classes=classes, head_zero_init=False)
    weights = root / "model.safetensors"
    vit.save_state_dict(model.state_dict(), model.config, weights)
    return {"model": str(weights), "shards": str(shards)}


# ---------------------------------------------------------------------------------------------- tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_script(tmp_path: Path, *args: str, timeout: float = 300, **env: str) -> None:
    environment = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environment, **env},
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_fsdp_mixed_precision_checkpointing_and_compile_match_the_plain_path(tmp_path):
    _run_script(tmp_path, "ranks", str(_free_port()), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]

    for strategy in ("ddp", "fsdp"):
        bf16, other = ranks[0][f"bf16 {strategy}"], ranks[1][f"bf16 {strategy}"]
        assert bf16["strategy"] == strategy and bf16["bf16"]
        # the master weights and the gradients applied to them stay fp32 ...
        assert bf16["param_dtypes"] == bf16["grad_dtypes"] == ["torch.float32"], strategy
        # ... while the layers compute in bf16: under FSDP's policy with bf16 weights, under autocast casting fp32 ones
        assert bf16["seen"] == {
            "weight": f"torch.{'bfloat16' if strategy == 'fsdp' else 'float32'}",
            "output": "torch.bfloat16",
        }
        assert bf16["grad_norm"] == other["grad_norm"]  # the global norm, over both ranks
        assert (bf16["loss"] + other["loss"]) / 2 == pytest.approx(bf16["fp32_loss"], rel=1e-2)
        assert BF16_SEEN < bf16["grads_vs_fp32"] < BF16_RTOL, strategy
        assert bf16["update_vs_fp32"] < BF16_RTOL and bf16["grads_vs_autocast"] < BF16_RTOL, strategy
        # the sharded model's update is the unsharded one's under the same autocast
        assert bf16["update_vs_autocast"] == pytest.approx(bf16["grads_vs_autocast"], rel=1e-3), strategy

    for strategy in ("ddp", "fsdp"):
        for rank in ranks:
            checkpointing = rank[f"checkpointing {strategy}"]
            assert checkpointing["mlp_starts"] == [2, 4]  # two micro-batches; recomputed in backward once each
            assert checkpointing["max_grad_difference"] <= 1e-6 * checkpointing["max_grad"], strategy

    for rank in ranks:
        compiled = rank["compile fsdp"]
        assert compiled["compiled"] and compiled["graphs"] == 1 and compiled["graph_breaks"] == 0
        assert compiled["max_grad_difference"] < 1e-6


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    """One process, the single-worker path (no wrapper): checkpointed blocks give bit-identical gradients."""
    steps = {}
    for checkpointing in (False, True):
        parallel = _spread(_config(f"scale.activation_checkpointing={checkpointing}"), 0, 1)
        assert parallel.strategy == "single" and parallel.model.grad_checkpointing == checkpointing
        starts = _starts(parallel.model.blocks[0].attn)
        step = _step(parallel.model, parallel.wrapped, [_batch()])
        steps[checkpointing] = (len(starts), step)
    assert [steps[False][0], steps[True][0]] == [1, 2]
    plain, checkpointed = steps[False][1]["grads"], steps[True][1]["grads"]
    for name, grad in plain.items():
        assert checkpointed[name].equal(grad), name


@pytest.mark.slow
def test_compiled_blocks_compute_what_eager_ones_do():
    """``scale.compile`` on the single-worker path with Inductor, the default backend (it needs a C compiler: gcc
    here), on a model of 2 blocks of width 32, so compiling stays short (14 s on an idle 2-core box with a cold
    Inductor cache, ~20 s of CPU; ~5 s cached): the same outputs and gradients as eager within 1e-5, with and
    without activation checkpointing, from one graph."""
    import torch
    from torch._dynamo.utils import counters

    tiny = [
        "data.image_size=16",
        "model_args={dropout: 0.0, head_zero_init: false, width: 32, depth: 2, num_heads: 2, mlp_dim: 64}",
    ]
    torch._dynamo.reset()
    counters.clear()
    results = {}
    for compiled, checkpointing in ((False, False), (True, False), (True, True)):
        cfg = _config(*tiny, f"scale.compile={compiled}", f"scale.activation_checkpointing={checkpointing}")
        parallel = _spread(cfg, 0, 1)
        outputs = _outputs(parallel.model)
        step = _step(parallel.model, parallel.wrapped, [_batch(16)])
        results[compiled, checkpointing] = (outputs[0], step["grads"], parallel.model)
    eager_out, eager_grads, _ = results[False, False]
    for key in ((True, False), (True, True)):
        out, grads, model = results[key]
        assert all(block._compiled_call_impl is not None for block in model.blocks)
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # one graph for both blocks and both models (the blocks' code is one; their weights are inputs), none broken
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert counters["inductor"], "compiled, but not by Inductor"


def _classifier(root: Path):
    """The registered model's pyfunc (``ViTClassifier``) loaded over a tiny model, as MLflow loads it, and PNG
    images to score."""
    import io
    import types

    from PIL import Image

    from pipelines.registry.pyfunc_model import ViTClassifier

    weights = _eval_set(root)["model"]
    (root / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    (root / "preprocessing.json").write_text(json.dumps({"image_size": 16}))
    artifacts = {
        "weights": weights,
        "classes": str(root / "classes.json"),
        "preprocessing": str(root / "preprocessing.json"),
    }
    classifier = ViTClassifier()
    classifier.load_context(types.SimpleNamespace(artifacts=artifacts))
    rng = np.random.default_rng(1)
    images = []
    for _ in range(6):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return classifier, images


def test_the_registered_model_chooses_its_device_and_precision(tmp_path, monkeypatch):
    """The GPU when torch sees one, else the CPU; VIT_DEVICE chooses instead, and a GPU asked for where there is
    none is an error, not a quiet CPU run. VIT_PRECISION=bf16 scores under autocast, close to fp32."""
    import torch

    from pipelines.registry.pyfunc_model import _inference_bf16, _inference_device

    monkeypatch.delenv("VIT_DEVICE", raising=False)
    monkeypatch.delenv("VIT_PRECISION", raising=False)
    assert _inference_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert not _inference_bf16()
    monkeypatch.setenv("VIT_DEVICE", "cpu")
    assert _inference_device() == torch.device("cpu")
    monkeypatch.setenv("VIT_DEVICE", "gpu0")
    with pytest.raises(ValueError, match=r"VIT_DEVICE='gpu0' is not a torch device"):
        _inference_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("VIT_DEVICE", "cuda:0")
        with pytest.raises(ValueError, match=r"VIT_DEVICE='cuda:0', but torch sees no CUDA device here"):
            _inference_device()
    monkeypatch.setenv("VIT_PRECISION", "fp16")
    with pytest.raises(ValueError, match="VIT_PRECISION='fp16': expected fp32 or bf16"):
        _inference_bf16()

    monkeypatch.setenv("VIT_DEVICE", "cpu")
    scored = {}
    for precision in ("fp32", "bf16"):
        monkeypatch.setenv("VIT_PRECISION", precision)
        classifier, images = _classifier(tmp_path)
        assert classifier.device == torch.device("cpu") and classifier.bf16 == (precision == "bf16")
        assert classifier.model.pos_embed.dtype == torch.float32  # autocast, not bf16 weights
        scored[precision] = classifier.predict(None, images, {"top_k": 3})
    fp32, bf16 = (np.array(scored[p]["top_probabilities"].tolist()) for p in ("fp32", "bf16"))
    assert not np.array_equal(fp32, bf16)  # computed in bf16 ...
    np.testing.assert_allclose(bf16, fp32, atol=2e-2)  # ... to within its precision


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
def test_on_a_gpu_the_registered_model_and_evaluation_score_as_on_the_cpu(tmp_path, monkeypatch):
    import torch

    from pipelines.evaluation.evaluate import EvaluateConfig, evaluate_model

    monkeypatch.delenv("VIT_PRECISION", raising=False)
    scored = {}
    for device in ("cuda", "cpu"):
        monkeypatch.setenv("VIT_DEVICE", device)
        classifier, images = _classifier(tmp_path)
        assert next(classifier.model.parameters()).device.type == device
        scored[device] = np.array(classifier.predict(None, images, {"top_k": 3})["top_probabilities"].tolist())
    np.testing.assert_allclose(scored["cuda"], scored["cpu"], atol=2e-3)  # cuDNN's patch convolution runs in TF32

    cfg = EvaluateConfig(**_eval_set(tmp_path), batch_size=8, loader_workers=0, shots=[1], fewshot_val_per_class=1)
    on_gpu = evaluate_model(cfg, lambda _: None)
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: False)
        on_cpu = evaluate_model(cfg, lambda _: None)
    assert on_gpu["eval/images"] == on_cpu["eval/images"] == 24
    for key in ("eval/top1", "eval/top5", "fewshot/1shot"):
        assert on_gpu[key] == pytest.approx(on_cpu[key], abs=1 / 24), key


def test_evaluation_labels_survive_loader_workers(tmp_path):
    """The loader refills its batch buffers; the per-image labels and few-shot features kept across batches are
    copies: with a loader worker, the same figures as in process."""
    from pipelines.evaluation.evaluate import EvaluateConfig, evaluate_model

    found = {}
    for workers in (0, 1):
        cfg = EvaluateConfig(
            **_eval_set(tmp_path), batch_size=2, loader_workers=workers, shots=[1], fewshot_val_per_class=1
        )
        details = {}
        metrics = evaluate_model(cfg, lambda _: None, details=details)
        found[workers] = ({k: v for k, v in metrics.items() if k != "eval/seconds"}, details["labels"].tolist())
    assert found[0][1] == [_label(i, 3) for i in range(24)]  # 12 batches: twice a loader worker's ring of buffers
    assert found[1] == found[0]


def test_the_pretrained_features_and_an_untrained_copy_are_probed_beside_the_model(tmp_path):
    """``pretrained``: the same probes on the weights fine-tuned from and on their architecture at random init.
    Known answers: the model itself as its own pretrained weights scores exactly as the model; seed 0 rebuilds the
    model's own initialisation (it was made after ``manual_seed(0)``), whatever the caller's random state."""
    import torch

    from pipelines.evaluation.evaluate import EvaluateConfig, evaluate_model

    eval_set = _eval_set(tmp_path)
    cfg = EvaluateConfig(**eval_set, pretrained=eval_set["model"], batch_size=8, loader_workers=0, shots=[1, 5])
    torch.manual_seed(123)
    metrics, lines = evaluate_model(cfg, lambda _: None), []
    torch.manual_seed(7)  # the untrained copy comes from its own seed, not from the caller's random stream
    assert evaluate_model(cfg, lambda _: None)["random_init/fewshot/5shot"] == metrics["random_init/fewshot/5shot"]
    for k in (1, 5):
        assert metrics[f"pretrained/fewshot/{k}shot"] == metrics[f"fewshot/{k}shot"]
        assert metrics[f"random_init/fewshot/{k}shot"] == metrics[f"fewshot/{k}shot"]  # the same initialisation
    cfg.random_init_seed = 1
    other = evaluate_model(cfg, lines.append)
    assert [other[f"random_init/fewshot/{k}shot"] for k in (1, 5)] != [metrics[f"fewshot/{k}shot"] for k in (1, 5)]
    assert any("at random init" in line for line in lines)
    assert "pretrained/fewshot/1shot" not in evaluate_model(EvaluateConfig(**eval_set, loader_workers=0, shots=[1]))


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluation_runs_in_a_ray_task_when_the_cluster_has_a_gpu(tmp_path):
    """A local Ray declaring one GPU on this CPU machine (in a subprocess: the session's Ray stays as it is): the
    evaluation runs in a task, in another process, and finds the driver's figures."""
    _run_script(tmp_path, "ray", str(tmp_path), timeout=240)
    found = json.loads((tmp_path / "ray.json").read_text())
    driver, task = found["driver"], found["task"]
    assert driver["worker"] is None  # no Ray: scored where it was asked
    assert task["worker"]["pid"] != found["driver_pid"] and task["worker"]["device"] == "cpu"
    assert task["lines"][0].startswith("in a Ray task on node ")
    assert task["lines"][1:] == driver["lines"]
    for key in ("metrics", "labels", "top1_correct", "confusion"):
        assert task[key] == driver[key], key
    assert driver["metrics"]["eval/images"] == 24 and "fewshot/1shot" in driver["metrics"]


if __name__ == "__main__":
    if sys.argv[1] == "ranks":
        import torch.multiprocessing as mp

        mp.spawn(_rank_main, args=(2, int(sys.argv[2]), sys.argv[3]), nprocs=2)
    elif sys.argv[1] == "ray":
        _ray_main(sys.argv[2])
