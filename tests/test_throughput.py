"""Issue 13: one trial's measured throughput (trainables/throughput.py) and the sweep's bill
(launch.py --dry-run --estimate, service/estimate.py), on tiny CPU configs of the real code path."""
from __future__ import annotations

import pytest

from smear.data.domainnet import num_classes
from trainables.throughput import calibration_config, measure, paper_config, scratch_data


def test_paper_shapes_become_runnable_here_without_a_download(tmp_path):
    t5 = calibration_config(paper_config("t5_glue", "smear"), device="cpu", data_dir=tmp_path, steps=2, batch_size=2)
    assert t5["t5"]["model"] == "tiny" and t5["t5"]["tokenizer"] == "byt5"      # random weights, no download
    assert {k: t5["t5"][k] for k in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab_size")} == \
        {"d_model": 768, "d_ff": 2048, "num_layers": 12, "num_heads": 12, "d_kv": 64, "vocab_size": 32128}
    assert t5["t5"]["max_source_len"] == 128 and t5["batch_size"] == 2 and t5["steps"] == 2
    resnet = calibration_config(paper_config("resnet_domainnet", "adapter"), device="cpu", data_dir=tmp_path, steps=2)
    assert resnet["pretrained"] == "none" and resnet["batch_size"] == 128 and resnet["data"]["resolution"] == 224
    root = resnet["data"]["root"]
    assert num_classes(root, resnet["data"]["domains"]) == 345                  # DomainNet's classes, real JPEGs
    assert (tmp_path / "domainnet" / "clipart_train.txt").read_text().split()[0].endswith(".jpg")


def test_measure_runs_the_trial_and_counts_work_and_data_wait(tmp_path):
    """ResNet: images per step = the batch; with no loader workers the decoding is all waiting for data.
    T5: every generated source fills max_source_len tokens."""
    with scratch_data(tmp_path / "scratch"):
        over = {"torch_threads": 1, "data": {"resolution": 32, "loader_workers": 0}}
        cfg = calibration_config(paper_config("resnet_domainnet", "smear"), device="cpu", data_dir=tmp_path, steps=3,
                                 batch_size=4, overrides=over)
        m = measure(cfg, steps=2, warmup=1)
        assert (m.setting, m.method, m.precision, m.unit, m.work, m.steps) == ("resnet_domainnet", "smear", "fp32",
                                                                                 "images", 8.0, 2)
        assert 0 < m.data_wait_s < m.seconds and 0 < m.data_wait_fraction < 1
        assert m.peak_mem_kind == "cpu_peak_rss" and m.peak_mem_mb > 100
        t5 = calibration_config(paper_config("t5_glue", "adapter"), device="cpu", data_dir=tmp_path, steps=2,
                                batch_size=2, overrides={"torch_threads": 1, "precision": "bf16",
                                                         "t5": {"d_model": 32, "d_ff": 64, "num_layers": 1,
                                                                "num_heads": 2, "d_kv": 16, "max_source_len": 24}})
        m = measure(t5, steps=1, warmup=1)
        assert (m.unit, m.work, m.precision) == ("tokens", 2 * 24.0, "bf16")
        assert m.steps_per_s > 0 and m.work_per_s == pytest.approx(48 / m.seconds)


def _n(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.slow
def test_estimate_prints_a_bill_per_setting_and_method(tmp_path, offline_data, monkeypatch, capsys):
    """The default sweep (3 methods x 2 seeds, 300 steps, CPU trials): one row per method, positive hours,
    total = sum of the rows, cost = hours x price; calibrated on this CPU, and it says so; nothing written."""
    from service.launch import main

    monkeypatch.chdir(tmp_path)
    rc = main(["--dry-run", "--estimate", "--calibration-steps", "1", "--price-per-gpu-hour", "2.5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "calibrated on CPU: GPU hours will be far lower; run on a GPU node for a real bill" in out
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| setting")]
    assert rows and all(len(r) == 10 for r in rows), out
    body, total = rows[:-1], rows[-1]
    assert {(r[0], r[1]) for r in body} == {("resnet_domainnet", m) for m in ("smear", "tag", "adapter")}
    assert total[0] == "total" and sum(int(r[2]) for r in body) == int(total[2]) == 6
    for setting, method, trials, steps, rate, wait, per_gpu, trial_h, device_h, cost in body:
        assert trials == "2" and steps == "300" and per_gpu == "CPU trial" and wait.endswith("%")
        assert _n(device_h) > 0 and _n(device_h) == pytest.approx(_n(trial_h), rel=1e-3)  # CPU trial: share 1
        assert _n(device_h) == pytest.approx(2 * 300 / _n(rate) / 3600, rel=2e-3)
        assert _n(cost) == pytest.approx(_n(device_h) * 2.5, rel=2e-3)
    assert _n(total[8]) == pytest.approx(sum(_n(r[8]) for r in body), rel=2e-3)
    assert _n(total[9]) == pytest.approx(_n(total[8]) * 2.5, rel=2e-3)
    assert list(tmp_path.iterdir()) == []                                       # a dry run writes nothing
