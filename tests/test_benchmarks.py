"""Smoke tests of benchmarks/: each script runs with ``--quick`` sizes and writes valid JSON with
the expected keys. No timing asserts (figures come from the scripts, see benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402

torch.set_num_threads(1)

MACHINE_KEYS = {
    "torch",
    "device",
    "device_name",
    "cpu_count",
    "torch_threads",
    "load_avg_start",
    "load_avg_end",
    "started",
    "finished",
    "noisy",
}
SCRIPTS = {
    "guard_overhead": (
        [],
        {"config", "step_time", "ratio_vs_unguarded", "host_syncs_per_step", "target"},
    ),
    "throughput": (["--no_compile"], {"config", "variants", "default", "target"}),
    "loop": (["--no_compile"], {"config", "variants", "fastest", "goal"}),
    "data_loading": ([], {"config", "loader", "train_step", "loader_vs_step", "target"}),
    "predict": ([], {"config", "variants", "tiled_vs_whole_time"}),
    "quality": (
        ["--set", "beta=0.5", "--keep", "{tmp}/keep"],
        {"train_config", "fit", "test", "gains", "goal"},
    ),
    "shared_cpu": ([], {"config", "idle_step_s", "busy_step_s", "busy_over_idle", "target"}),
    "tiling": ([], {"config", "global_pooling", "tlc", "per_image"}),
    "ensemble": ([], {"config", "ensembles"}),
    "by_kernel": ([], {"config", "blurred_psnr_db", "models"}),
    "natural_share": ([], {"config", "blurred_psnr_db", "start_gain_db", "shares"}),
}


_CACHE: dict[str, dict] = {}


def _run(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run ``benchmarks/<name>.py --quick`` once per test session; its JSON result."""
    if name in _CACHE:
        return _CACHE[name]
    tmp_path = tmp_path_factory.mktemp(name)
    extra = SCRIPTS[name][0]
    out = tmp_path / f"{name}.json"
    args = [a.format(tmp=tmp_path) for a in extra]
    cmd = [
        sys.executable,
        str(BENCH / f"{name}.py"),
        "--quick",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _CACHE[name] = json.loads(out.read_text())
    return _CACHE[name]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_writes_json_with_expected_keys(name, tmp_path_factory):
    keys = SCRIPTS[name][1]
    result = _run(name, tmp_path_factory)
    assert result["benchmark"] == name
    assert MACHINE_KEYS <= set(result["machine"])
    assert result["machine"]["quick"] is True
    assert result["machine"]["torch_threads"] == 1
    assert keys <= set(result), set(result)


def test_guard_overhead_counts_seed_checks_and_no_syncs_for_ours(tmp_path_factory):
    result = _run("guard_overhead", tmp_path_factory)
    syncs = result["host_syncs_per_step"]
    assert syncs["guarded"]["tensor_method_calls_per_step"] == 0
    assert syncs["unguarded"]["tensor_method_calls_per_step"] == 0
    checks = result["config"]["seed_style_checks_per_step"]
    assert syncs["seed_style"]["tensor_method_calls_per_step"] == checks
    assert result["guarded_and_unguarded_weights_identical"] is True
    assert result["guarded_vs_unguarded_max_abs_weight_diff"] == 0.0


def test_gpu_params_has_the_loader_settings():
    params, source = _common.gpu_params()
    assert {"batch_size", "crop_size"} <= set(params), source


def test_count_host_reads_counts_item_and_bool_and_restores_methods():
    original = torch.Tensor.item
    x = torch.ones(2)
    with _common.CountHostReads() as reads:
        x.sum().item()
        if x.any():
            pass
        torch.isfinite(x).all()  # a device op: not a read
    assert reads.counts["item"] == 1 and reads.counts["__bool__"] == 1 and reads.total == 2
    assert torch.Tensor.item is original


def test_summary_and_peak_memory():
    s = _common.summary([3.0, 1.0, 2.0])
    assert s["median_s"] == 2.0 and s["min_s"] == 1.0 and s["n"] == 3
    peak = _common.peak_memory_mib(torch.device("cpu"))
    assert peak is None or peak > 0


def test_quality_set_overrides_reach_the_training_config(tmp_path_factory):
    result = _run("quality", tmp_path_factory)
    assert result["train_config"]["beta"] == 0.5 and result["overrides"] == ["beta=0.5"]
    assert result["test"]["n_images"] == 2 and result["fit"]["stop_reason"] == "completed"


def test_quality_scores_the_last_checkpoint(tmp_path_factory):
    """The model figure is last.pt's (never the epoch picked on the test split): rescoring
    the kept last.pt on the kept test split gives the same per-image PSNR."""
    from deblur_lib.notebook import classical
    from deblur_lib.weights import load_model

    result = _run("quality", tmp_path_factory)
    keep = Path(result["train_config"]["test_data"]).parent.parent
    model, _ = load_model(str(keep / "run" / "last.pt"))
    test = classical.load_samples(keep / "data" / "test", 2)
    per_image, _ = classical.evaluate_methods(test, {"m": classical.model_restorer(model, "cpu")})
    expected = [round(float(v), 3) for v in per_image.psnr]
    assert result["test"]["model"]["psnr_db_per_image"] == pytest.approx(expected, abs=2e-3)


def test_quality_set_rejects_unknown_keys_and_reads_yaml_values():
    import quality

    settings = {"crop_size": 128}
    assert quality.apply_overrides(settings, ["alpha=0.84", "amp=bf16", "compile=true"])
    assert settings == {"crop_size": 128, "alpha": 0.84, "amp": "bf16", "compile": True}
    for bad in ("alpha", "lr=0.1", "=3"):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            quality.apply_overrides(settings, [bad])


def test_ensemble_reports_gain_and_cost_against_a_single_pass(tmp_path_factory):
    result = _run("ensemble", tmp_path_factory)
    rows = result["ensembles"]
    assert list(rows) == ["1", "8"] and result["config"]["n_images"] == 2
    assert rows["1"]["gain_db"] == 0.0 and rows["1"]["time_ratio"] == 1.0
    assert rows["8"]["gain_db"] == rows["8"]["psnr_db"] - rows["1"]["psnr_db"]
    assert all(r["s_per_image"] > 0 and 0 < r["ssim"] <= 1 for r in rows.values())


@pytest.mark.parametrize(
    ("cpu", "long_run", "throughput_names"),
    [
        ("avx2", None, ("channels_last", "channels_last")),
        ("avx512", None, ("channels_last", "channels_last")),
        (
            "avx512_bf16",
            "--channels_last auto --compile true",
            ("bf16_channels_last", "compile_bf16_channels_last"),
        ),
    ],
)
def test_the_benchmarks_time_what_auto_decides_on_each_cpu(cpu_is, cpu, long_run, throughput_names):
    """loop.py's runs and throughput.py's ``default`` follow build's auto rules: a long run
    compiles only where the CPU has bf16 instructions (fp32 stays eager channels_last)."""
    import loop
    import throughput

    cpu_is(cpu)
    found = loop.variants()
    assert "--amp auto --channels_last auto --compile false" in " ".join(found["default_short"])
    if long_run is None:
        assert "default_long" not in found
    else:
        assert " ".join(found["default_long"]).endswith(long_run)
    assert throughput.default_variants(torch.device("cpu")) == throughput_names
    assert set(throughput_names) <= set(throughput.EAGER) | set(throughput.COMPILED)
    fp32 = loop.variants(amp="off")  # fp32 on any CPU: auto stays eager, compiled on request
    assert " ".join(fp32["default_short"]) == "--amp off --channels_last auto --compile false"
    assert "default_long" not in fp32  # and the question it asks: would compiling pay?
    assert " ".join(fp32["compiled"]) == "--amp off --channels_last auto --compile true"
    assert "compiled" not in loop.variants(compiled=False, amp="off")


def test_loop_takes_only_auto_or_off_for_amp():
    import loop

    with pytest.raises(ValueError, match="'bf16'"):
        loop.variants(amp="bf16")


def test_loop_runs_each_speed_setting_as_the_cli_reports_it(tmp_path_factory):
    result = _run("loop", tmp_path_factory)
    runs = result["variants"]
    assert set(runs) == {"previous", "default_short"}  # --no_compile: no compiled run
    assert runs["previous"]["speedup_vs_previous"] == 1.0
    prev = runs["previous"]["runs"][0]
    assert prev["speed"] == (
        "bf16 off (--amp off), channels_last off (--channels_last false), compile off "
        "(--compile false)"
    )
    assert "compile off" in runs["default_short"]["runs"][0]["speed"]
    for r in runs.values():
        assert len(r["runs"]) == 1 and len(r["runs"][0]["epoch_s"]) == 2
        assert r["steady_epoch_s"] == r["runs"][0]["epoch_s"][1] > 0
