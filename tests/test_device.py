"""Device-clean code (issue 23): every path runs on a model that is not on the CPU, and on a model split over two
devices, with the CPU's numbers exactly, on a CPU-only torch.

Every other test runs on the CPU, where every tensor is on one device, so a tensor made on the CPU and then mixed
with the model's (``torch.isin(p, torch.tensor(wanted))`` with ``p`` on the GPU), or a ``.numpy()`` of a result that
never left the GPU, passes there and stops the first GPU run. Here the tiny models are moved to *fake* devices
(``tests/fake_devices.py``): tensors that say ``fakegpu:0`` (or ``fakegpu:1``) and hold CPU data, with eager
PyTorch's device rules enforced on every operation. Why not ``FakeTensorMode`` with a fake CUDA device (the issue's
suggestion)? Its tensors hold no values, so every data-dependent step of these paths (``PrefixCache.keep``'s
``nonzero`` and ``tolist``, the finite-logits check, the hooks' position lists) stops it, and on this CPU-only build
it cannot even index a fake CUDA tensor with CPU indices (it tries to move them to a real GPU); and a CPU-only build
has no CUDA device guard at all, so the fake device type is a renamed PrivateUse1 (``fakegpu``). The code under test
never names a device type, it takes the model's, so this exercises the same lines a CUDA run does.

Whole paths run (no guard to switch on, nothing tested in isolation only): the shared prefix (build, keep, suffix
logits), isolation, extraction, compression, tuning's attention report, shift floor and cached evaluations,
re-weighting's evaluation, and both benchmarks' measurements; each result must equal the CPU run's bit for bit. The
benchmarks must also synchronise the device before every clock reading, and leave the CPU's threads alone when the
model is on a GPU.

Split over two devices (what ``device_map="auto"`` does for a model that fits no single card): accelerate's hooks
move each layer's inputs to its device; the prefix cache must keep each layer's keys, values and positions on that
layer's device.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import tiny_loaded_model
from fake_devices import NAME, SYNCHRONIZE, DeviceMismatch, FakeDevices, OnDevice, install, split

from helpers.core.prefix import build_prefix, split_prompts, suffix_logits
from helpers.core.prompts import label_token_ids
from helpers.core.runs import make_prompts
from helpers.core.tasks import load_task

GPU = f"{NAME}:0"
GPUS = (f"{NAME}:0", f"{NAME}:1")
install()  # at collection, before any test's backward pass starts autograd's device threads (sized by the devices
# known then: a later backward on a fake device would find no queue for it)


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_task("sst2", data_dir)


@pytest.fixture(scope="module")
def tokenizer(offline_tokenizers):
    return offline_tokenizers["smollm2-135m"]


def _lm(family, tokenizer):
    return tiny_loaded_model(family, tokenizer, f"tiny-{family}")


def _on_device(lm, where=GPU):
    """``lm`` moved to the fake device ``where`` (or split over ``GPUS`` with ``where="split"``); call inside
    :class:`FakeDevices`."""
    if where == "split":
        split(lm.model, GPUS)
    else:
        lm.model.to(where)
    return lm


def _same(a, b, path=""):
    """Results equal (dicts, tuples, arrays, tensors; integers bit for bit, floats to float32 rounding: a model split
    over devices runs its products in other shapes, and some CPUs then round differently), and none left on a fake
    device."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert not isinstance(a, OnDevice), f"{path} is still on {a.device}"
        tol = 1e-5 if a.is_floating_point() else 0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=path)
    elif isinstance(a, np.ndarray):
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=path)
        else:
            np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b, path


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _both(family, tokenizer, run, where=GPU):
    """``run(lm)`` on the CPU and on the fake device(s); the two results must be equal."""
    on_cpu = run(_lm(family, tokenizer))
    with FakeDevices():
        lm = _on_device(_lm(family, tokenizer), where)
        assert lm.device.type == NAME
        on_device = run(lm)
    _same(on_device, on_cpu)
    return on_device


# --------------------------------------------------------------------------------------------------------------------
# The fake devices themselves
# --------------------------------------------------------------------------------------------------------------------


def test_fake_devices_enforce_eager_device_rules():
    """The rules the tests rely on, as on a real GPU: mixing raises, CPU scalars and CPU indices may meet a device
    tensor, .numpy() needs .cpu() first, and the values are real."""
    with FakeDevices():
        x = torch.arange(5, device=GPU)
        assert x.device == torch.device(GPU) and x.tolist() == [0, 1, 2, 3, 4]
        with pytest.raises(DeviceMismatch):
            torch.isin(x, torch.tensor([1, 2]))  # the example
        with pytest.raises(DeviceMismatch):
            torch.cat([x, torch.arange(2)])
        with pytest.raises(DeviceMismatch):
            x + torch.arange(5, device=GPUS[1])
        with pytest.raises(DeviceMismatch):
            torch.arange(5)[x[:2]]  # device indices into a CPU tensor
        with pytest.raises(TypeError, match="cpu"):
            x.numpy()
        assert torch.isin(x, torch.tensor([1, 2], device=GPU)).tolist() == [False, True, True, False, False]
        assert (x + torch.tensor(1)).device == x.device  # a CPU scalar
        assert x[torch.tensor([1, 3])].tolist() == [1, 3]  # CPU indices
        y = torch.zeros(5, dtype=torch.long, device=GPU)
        y[:2] = torch.tensor([7, 8])  # a copy between devices
        assert y.cpu().numpy().tolist() == [7, 8, 0, 0, 0] and int(y.sum().item()) == 15
        assert x.nonzero().flatten().tolist() == [1, 2, 3, 4]
        w = torch.ones(3, 4, device=GPU)
        assert (torch.ones(4, device=GPU) @ w.T).shape == (3,)  # matmul's in-place squeeze_ keeps the shapes right


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_a_model_on_a_fake_device_gives_the_cpu_logits(family, tokenizer):
    ids = [[1, 5, 7, 9, 3, 4, 8, 11]]

    def run(lm):
        with torch.no_grad():
            return lm.model(input_ids=torch.tensor(ids, device=lm.device)).logits.cpu()

    _both(family, tokenizer, run)
    _both(family, tokenizer, run, "split")
    with FakeDevices():
        lm = _on_device(_lm(family, tokenizer))
        with pytest.raises(DeviceMismatch):
            lm.model(input_ids=torch.tensor(ids))  # CPU ids into a device model: what these tests catch


# --------------------------------------------------------------------------------------------------------------------
# The shared prefix and the experiments over it
# --------------------------------------------------------------------------------------------------------------------


def _prompts(lm, data, n=3, shots=1):
    return make_prompts(lm, data, seed=42, n_test=n, shots_per_class=shots)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_shared_prefix_on_a_device(family, tokenizer, sst2):
    """build_prefix, keep (the issue's first row: torch.isin with the wanted positions on the CPU) and suffix
    logits, full vocabulary and label words only."""
    def run(lm):
        prompts = _prompts(lm, sst2)
        s = split_prompts(prompts)
        suffixes = [s.suffix(p) for p in prompts]
        pad = lm.tokenizer.pad_token_id
        full = build_prefix(lm.model, s.ids)
        small = full.keep(prompts[0].label_positions + (len(s.ids) - 1,))
        with torch.no_grad():
            return {"full": suffix_logits(lm.model, full, suffixes, pad).cpu(),
                    "small": suffix_logits(lm.model, small, suffixes, pad).cpu(),
                    "labels": suffix_logits(lm.model, small, suffixes, pad,
                                            label_ids=label_token_ids(sst2.task, lm.tokenizer)).cpu(),
                    "entries": small.entries(), "kept": small.kept_positions()}

    _both(family, tokenizer, run)


def test_isolation_on_a_device(tokenizer, sst2):
    from helpers.experiments.isolation import run_isolation

    kw = dict(ks=(1,), random_ks=(1,), seed=42, batch_size=2, progress=False)
    _both("qwen2", tokenizer, lambda lm: run_isolation(lm, sst2.task, _prompts(lm, sst2), **kw))
    _both("qwen2", tokenizer, lambda lm: run_isolation(lm, sst2.task, _prompts(lm, sst2, n=2), shared_prefix=False,
                                                       **kw))


def test_extraction_on_a_device(tokenizer, sst2):
    from helpers.experiments.extraction import label_attention

    for shared in (True, False):
        _both("llama", tokenizer, lambda lm: label_attention(lm, sst2.task, _prompts(lm, sst2), batch_size=2,
                                                             progress=False, shared_prefix=shared))


def test_compression_on_a_device(tokenizer, sst2):
    from helpers.experiments.compression import compression_run

    _both("gemma3", tokenizer, lambda lm: compression_run(lm, sst2.task, _prompts(lm, sst2), seed=42, n_random=1,
                                                          variants=("full", "anchor", "random"), batch_size=2,
                                                          progress=False))


# --------------------------------------------------------------------------------------------------------------------
# Tuning and re-weighting (the second row: .numpy() of attention still on the device)
# --------------------------------------------------------------------------------------------------------------------


def _trained(lm, rng_seed=5):
    """A re-weighting beta, a soft prompt and a prefix of 2 (random, seeded): what the report and evaluations read."""
    from helpers.experiments import tuning as tu

    cfg = lm.model.config.get_text_config()
    g = torch.Generator().manual_seed(rng_seed)
    d = cfg.hidden_size
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    return {
        "anchor": {"beta": torch.randn(lm.n_layers, lm.n_heads, 2, generator=g).numpy()},
        "prompt-2": {"soft": torch.randn(2, d, generator=g).numpy()},
        "prefix-2": {"keys": torch.randn(lm.n_layers, 1, kv_heads, 2, head_dim, generator=g).numpy(),
                     "values": torch.randn(lm.n_layers, 1, kv_heads, 2, head_dim, generator=g).numpy()},
        "pez-2": {"ids": np.array(tu.random_init_ids(lm.tokenizer, 2, 42))},
    }


def test_tuning_on_a_device(tokenizer, sst2):
    from helpers.experiments import tuning as tu
    from helpers.experiments.reweighting import class_positions, evaluate

    def run(lm):
        prompts = _prompts(lm, sst2, n=2)
        trained = _trained(lm)
        out = {m: tu.attention_report(lm, prompts, m, t, 2) for m, t in trained.items()}
        out["floor"] = tu.shift_floor(lm, prompts, (1, 3))
        dev = lm.device
        out["soft"] = tu.evaluate_soft(lm, sst2.task, prompts, torch.from_numpy(trained["prompt-2"]["soft"]).to(dev), 2)
        kv = [(torch.from_numpy(k).to(dev), torch.from_numpy(v).to(dev))
              for k, v in zip(trained["prefix-2"]["keys"], trained["prefix-2"]["values"])]
        out["prefix"] = tu.evaluate_prefix(lm, sst2.task, prompts, kv, 2)
        beta = torch.from_numpy(trained["anchor"]["beta"]).to(dev)
        for shared in (True, False):
            out[f"reweighted-{shared}"] = evaluate(lm, sst2.task, prompts, beta, lambda p: class_positions(p, 2),
                                                   batch_size=2, progress=False, shared_prefix=shared)
        return out

    _both("gemma3", tokenizer, run)


def test_training_on_a_device(tokenizer, sst2):
    """What tuning and re-weighting train (one epoch on two prompts): beta, a soft prompt, a prefix, PEZ. Equal to
    the CPU's to float rounding (the backward pass runs on the device's autograd thread, see
    :func:`test_saliency_on_a_device`)."""
    from helpers.experiments import tuning as tu
    from helpers.experiments.reweighting import TrainConfig, class_positions, train_beta

    config = TrainConfig(epochs=1)

    def run(lm):
        prompts = _prompts(lm, sst2, n=2)
        return {"anchor": train_beta(lm, sst2.task, prompts, lambda p: class_positions(p, 2), 42, config),
                "prompt": tu.train_soft(lm, sst2.task, prompts, 2, 42, config),
                "prefix": tu.train_prefix(lm, sst2.task, prompts, 2, 42, config),
                "pez": tu.train_pez(lm, sst2.task, prompts, 2, 42, config)}

    on_cpu = run(_lm("gemma3", tokenizer))
    with FakeDevices():
        on_device = run(_on_device(_lm("gemma3", tokenizer)))
    for method, trained in on_cpu.items():
        for key, value in trained.items():
            got = on_device[method][key]
            assert isinstance(got, np.ndarray), (method, key)
            if not key.endswith("_s"):  # not the times
                np.testing.assert_allclose(got, value, rtol=1e-4, atol=1e-6, err_msg=f"{method} {key}")


# --------------------------------------------------------------------------------------------------------------------
# The benchmarks (the third row)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def clock_log(monkeypatch):
    """The sequence of device synchronisations ("sync") and clock readings ("clock") while a benchmark runs."""
    install()
    log: list[str] = []
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: (log.append("clock"), real())[1])
    SYNCHRONIZE.append(lambda device: log.append("sync"))
    yield log
    SYNCHRONIZE.clear()


def test_saliency_on_a_device(tokenizer, sst2):
    """Saliency (a backward pass) on a device, the current path and the benchmark's old one. Equal to the CPU's to
    float rounding, not bit for bit: autograd runs a non-CPU device's backward on its own worker thread, whose
    accumulation differs from the CPU's in the last bits (about 1e-7 relative; the forward passes above are exact)."""
    from helpers.cli.speed import old_saliency_flow
    from helpers.core.saliency import saliency_flow

    def run(lm):
        own = make_prompts(lm, sst2, 42, 2, 1, per_example=True)
        return saliency_flow(lm, sst2.task, own, batch_size=4, progress=False), old_saliency_flow(lm, sst2.task, own)

    on_cpu = run(_lm("llama", tokenizer))
    with FakeDevices():
        on_device = run(_on_device(_lm("llama", tokenizer)))
    for a, b in zip(on_device, on_cpu):
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def _timed_after_sync(log):
    assert "clock" in log
    unsynced = [i for i, e in enumerate(log) if e == "clock" and (i == 0 or log[i - 1] != "sync")]
    assert not unsynced, f"{len(unsynced)} of {log.count('clock')} clock readings without the device synchronised"


def _untimed(result):
    """A benchmark's result without what depends on the clock (times, ratios, fits) and without the saliency
    difference (see :func:`test_saliency_on_a_device`)."""
    if isinstance(result, dict):
        return {k: _untimed(v) for k, v in result.items()
                if not any(w in k for w in ("time", "_s", "ratio", "load", "ceiling", "break_even", "/", "fixed",
                                            "per_", "flows_max_rel_diff"))}
    return result


def test_compression_bench_on_a_device(tokenizer, sst2, clock_log):
    from helpers.cli import bench

    def run(lm):
        return [_untimed(bench.bench_task(lm, sst2, shots=1, n=2, reps=1, batch_size=b)) for b in (1, 2)]

    _both("llama", tokenizer, run)
    with FakeDevices():
        lm = _on_device(_lm("llama", tokenizer))
        clock_log.clear()
        bench.bench_task(lm, sst2, shots=1, n=2, reps=1, batch_size=1)
        _timed_after_sync(clock_log)
        clock_log.clear()
        r = bench.forward_times(lm, lengths=(1, 3), reps=2)
        _timed_after_sync(clock_log)
    assert len(r["times_s"]["3"]) == 2


def test_speed_bench_on_a_device(tokenizer, sst2, clock_log, monkeypatch):
    from helpers.cli import speed

    monkeypatch.setattr(speed, "KS", (1,))  # the tiny model has 3 layers
    monkeypatch.setattr(speed, "RANDOM_KS", (1,))

    def run(lm):
        r = speed.bench_task(lm, sst2, n=2, reps=1)
        for e in ("isolation", "extraction"):  # equal results of the new and the old path, on this device too
            assert r[e]["fallback_prompts"] == 0
        assert r["isolation"]["equal_predictions_and_top10"] and r["extraction"]["equal_predictions"]
        assert r["saliency"]["flows_max_rel_diff"] <= 1e-5
        return _untimed(r)

    _both("llama", tokenizer, run)
    with FakeDevices():
        lm = _on_device(_lm("llama", tokenizer))
        clock_log.clear()
        speed.bench_task(lm, sst2, n=2, reps=1)
        _timed_after_sync(clock_log)


def test_benchmarks_set_threads_only_on_the_cpu(tokenizer, monkeypatch, tmp_path):
    """One CPU thread for a CPU run (as every committed benchmark); a GPU run leaves the threads alone. Each
    benchmark passes its --device to load_model."""
    from helpers.cli import bench, speed

    calls: list = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    loaded: list = []

    def fake_load(name, device=None):
        loaded.append(device)
        return _on_device(_lm("llama", tokenizer)) if device is not None else _lm("llama", tokenizer)

    monkeypatch.setattr(bench, "load_model", fake_load)
    monkeypatch.setattr(speed, "load_model", fake_load)
    bench.forward_cost("tiny", lengths=(1, 2), reps=1)
    assert calls == [1] and loaded == [None]
    with FakeDevices():
        r = bench.forward_cost("tiny", lengths=(1, 2), reps=1, device=GPU)
        assert calls == [1] and loaded == [None, GPU] and r["device"] == GPU
        # no task data needed to see the device reach load_model, then stop (the tasks are loaded before the model)
        monkeypatch.setattr(speed, "load_task", lambda name: None)
        with pytest.raises(Exception):
            speed.bench_speed("tiny", ["no-such-task"], n=1, reps=1, out=tmp_path / "x.json", device=GPU)
    assert calls == [1] and loaded == [None, GPU, GPU]


# --------------------------------------------------------------------------------------------------------------------
# The command lines: --device, and sizes that must be at least 1
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--reps", "0"], ["--n", "0"], ["--batch-sizes", "0"], ["--batch-sizes", "1", "-2"],
                                  ["--batch-sizes"], ["--sweep-reps", "0"], ["--n", "x"], ["--device", "nowhere"]])
def test_bench_refuses_bad_sizes_and_devices(args, capsys, monkeypatch):
    from helpers.cli import bench

    def reached(*a, **k):
        raise AssertionError("a benchmark started with a size below 1 or a bad device")

    monkeypatch.setattr(bench, "bench_compression", reached)  # (today: --reps 0 ran until a StatisticsError)
    with pytest.raises(SystemExit) as err:
        bench.main(["compression", *args])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert f"argument {args[0]}" in message and ("at least 1" in message or "whole number" in message
                                                  or "torch device" in message or "expected" in message)


def test_bench_device_reaches_every_benchmark(monkeypatch, tmp_path):
    from helpers.cli import bench, speed

    seen = {}
    monkeypatch.setattr(bench, "bench_compression", lambda *a, device=None, **k: seen.__setitem__("compression", device))
    monkeypatch.setattr(bench, "forward_cost", lambda *a, device=None, **k: seen.__setitem__("forward-cost", device) or
                        {"fixed_s": 0.0, "per_token_s": 1.0, "fixed_in_tokens": 0.0})
    monkeypatch.setattr(speed, "bench_speed", lambda *a, device=None, **k: seen.__setitem__("speed", device))
    for what in ("compression", "forward-cost", "speed"):
        bench.main([what, "--device", "cuda:1", "--out", str(tmp_path / "x.json")])
    assert seen == {"compression": "cuda:1", "forward-cost": "cuda:1", "speed": "cuda:1"}


def test_compute_passes_its_device_to_load_model(monkeypatch, data_dir, capsys):
    """--device enters the results key (nothing is cached for a GPU run of the committed results) and load_model."""
    from helpers.cli import compute
    from helpers.core import models

    class Loaded(Exception):
        pass

    def fake_load(name, **kw):
        raise Loaded(kw)

    monkeypatch.setattr(models, "load_model", fake_load)
    with pytest.raises(Loaded) as err:
        compute.main(["reweighting", "--tasks", "sst2", "--device", "cuda"])
    assert err.value.args[0] == {"device": "cuda"}
    assert capsys.readouterr().out.startswith("0 of ")
    with pytest.raises(SystemExit):
        compute.main(["reweighting", "--device", "nowhere", "--dry-run"])


# --------------------------------------------------------------------------------------------------------------------
# Beyond one GPU: a model split over two devices
# --------------------------------------------------------------------------------------------------------------------


def _layer_devices(model) -> list[torch.device]:
    from helpers.core.prefix import layer_windows

    base = model.base_model
    layers = next(m for m in base.children() if isinstance(m, torch.nn.ModuleList))
    assert len(layers) == len(layer_windows(model)[0])
    return [next(layer.parameters()).device for layer in layers]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_split_model_keeps_each_layer_on_its_device(family, tokenizer, sst2):
    """Hooks and the prefix cache on a model whose layers live on two devices: each layer's keys, values and
    positions stay on its layer's device (build and keep), and the shared-prefix paths give the CPU's numbers."""
    from helpers.core.attention import Isolate

    with FakeDevices():
        lm = _on_device(_lm(family, tokenizer), "split")
        devices = _layer_devices(lm.model)
        assert set(devices) == {torch.device(d) for d in GPUS}
        prompts = _prompts(lm, sst2)
        s = split_prompts(prompts)
        for prefix in (build_prefix(lm.model, s.ids, [Isolate([prompts[0].label_positions], [0, 2])]),
                       build_prefix(lm.model, s.ids).keep(prompts[0].label_positions)):
            for layer, device in enumerate(devices):
                assert prefix.keys[layer].device == device and prefix.values[layer].device == device
                assert prefix.positions[layer].device == device

    def run(lm):
        from helpers.core.attention import Record, intervene

        prompts = _prompts(lm, sst2)
        s = split_prompts(prompts)
        small = build_prefix(lm.model, s.ids).keep(prompts[0].label_positions)
        record = Record(rows=torch.tensor([prompts[0].target]))  # layers on two devices, stacked on one
        with torch.no_grad():
            logits = suffix_logits(lm.model, small, [s.suffix(p) for p in prompts], lm.tokenizer.pad_token_id).cpu()
            with intervene(record):
                lm.model(input_ids=torch.tensor([prompts[0].input_ids], device=lm.device))
        return logits, record.stacked().cpu()

    _both(family, tokenizer, run, "split")


def test_split_model_shared_prefix_experiments(tokenizer, sst2):
    """Isolation and extraction over the shared prefix on a split model (untied output layer: see the next test)."""
    from helpers.experiments.extraction import label_attention
    from helpers.experiments.isolation import run_isolation

    kw = dict(ks=(1,), random_ks=(), seed=42, batch_size=2, progress=False)
    _both("llama", tokenizer, lambda lm: run_isolation(lm, sst2.task, _prompts(lm, sst2), **kw), "split")
    _both("llama", tokenizer, lambda lm: label_attention(lm, sst2.task, _prompts(lm, sst2), batch_size=2,
                                                         progress=False), "split")



@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_split_model_full_prompt_paths(family, tokenizer, sst2):
    from helpers.core.prompts import collate, target_label_logits, target_logits

    def run(lm):
        batch = collate(_prompts(lm, sst2), lm.tokenizer.pad_token_id)
        with torch.no_grad():
            return (target_logits(lm.model, batch).cpu(),
                    target_label_logits(lm.model, batch, label_token_ids(sst2.task, lm.tokenizer)).cpu())

    _both(family, tokenizer, run, "split")
