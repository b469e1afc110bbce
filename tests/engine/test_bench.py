"""The benchmark harness: built-in datasets, the setups' forget/retain sets, the CLI's JSON and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from worker.bench.methods import method_config
from worker.bench.report import summarise
from worker.bench.setups import build_setup, class_setup, data_setup, noisy_setup, random_setup
from worker.datasets import BuiltinDataset, load_dataset
from worker.engine.config import MixUnlearnConfig

RECORD_FIELDS = {"method", "setup", "seed", "dataset", "forget_frac", "forget_size", "metrics", "wall_s"}
RECORD_FIELDS |= {"time_ratio", "config", "asr_parts"}


@pytest.fixture(scope="module")
def mnist() -> BuiltinDataset:
    return load_dataset("mnist5k")


def test_mnist5k_split(mnist: BuiltinDataset) -> None:
    assert mnist.x.shape == (5000, 1, 28, 28) and mnist.x.dtype == np.float32
    assert mnist.x.min() == 0.0 and mnist.x.max() == 1.0
    assert mnist.y.dtype == np.int64 and mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    assert len(mnist.train_rows) == 4000 and len(mnist.heldout_rows) == 1000
    assert np.bincount(mnist.y[mnist.heldout_rows]).tolist() == [100] * 10
    assert np.array_equal(np.union1d(mnist.train_rows, mnist.heldout_rows), np.arange(5000))
    assert mnist.sample_ids[42] == "mnist5k-00042" and len(set(mnist.sample_ids)) == 5000
    again = load_dataset("mnist5k")
    assert np.array_equal(again.heldout_rows, mnist.heldout_rows)


def test_digits_split() -> None:
    digits = load_dataset("digits")
    assert digits.x.shape == (1797, 1, 8, 8) and digits.input_shape == (1, 8, 8)
    assert digits.x.max() == 1.0 and digits.x.min() == 0.0
    per_class = np.bincount(digits.y)
    assert np.array_equal(np.bincount(digits.y[digits.heldout_rows]), np.round(0.3 * per_class).astype(int))
    assert len(np.intersect1d(digits.train_rows, digits.heldout_rows)) == 0
    assert len(digits.train_rows) + len(digits.heldout_rows) == 1797
    with pytest.raises(ValueError, match="known: mnist5k, digits"):
        load_dataset("cifar10")


def test_datasets_and_cli_parser_never_import_torch() -> None:
    code = (
        "import sys, worker.datasets, service.cli; worker.datasets.load_dataset('digits'); "
        "service.cli.build_parser(); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _check_partition(mnist: BuiltinDataset, forget: np.ndarray, retain: np.ndarray) -> None:
    assert len(np.intersect1d(forget, retain)) == 0
    assert np.array_equal(np.union1d(forget, retain), mnist.train_rows)


def test_class_setup(mnist: BuiltinDataset) -> None:
    setup = class_setup(mnist.y, mnist.train_rows, forget_class=3)
    _check_partition(mnist, setup.forget_rows, setup.retain_rows)
    assert len(setup.forget_rows) == 400 and set(mnist.y[setup.forget_rows]) == {3}
    assert 3 not in set(mnist.y[setup.retain_rows]) and setup.forget_classes == {3}


def test_data_setup(mnist: BuiltinDataset) -> None:
    setup = data_setup(mnist.y, mnist.train_rows, seed=1)
    _check_partition(mnist, setup.forget_rows, setup.retain_rows)
    assert np.bincount(mnist.y[setup.forget_rows], minlength=10).tolist() == [0] * 5 + [160] * 5
    assert setup.forget_classes == {5, 6, 7, 8, 9}
    assert np.array_equal(data_setup(mnist.y, mnist.train_rows, seed=1).forget_rows, setup.forget_rows)
    assert not np.array_equal(data_setup(mnist.y, mnist.train_rows, seed=2).forget_rows, setup.forget_rows)


def test_noisy_setup_mislabels_exactly_the_forget_set(mnist: BuiltinDataset) -> None:
    setup = noisy_setup(mnist.y, mnist.train_rows, num_classes=10, seed=0)
    _check_partition(mnist, setup.forget_rows, setup.retain_rows)
    assert np.bincount(mnist.y[setup.forget_rows], minlength=10).tolist() == [240] * 5 + [0] * 5
    changed = np.flatnonzero(setup.train_labels != mnist.y)
    assert np.array_equal(changed, setup.forget_rows)  # every forget label wrong, nothing else touched
    assert setup.train_labels.min() >= 0 and setup.train_labels.max() <= 9
    assert setup.forget_classes == {0, 1, 2, 3, 4}


def test_random_setup(mnist: BuiltinDataset) -> None:
    setup = build_setup("random", mnist.y, mnist.train_rows, 10, seed=0, forget_frac=0.02)
    _check_partition(mnist, setup.forget_rows, setup.retain_rows)
    assert len(setup.forget_rows) == 80 and setup.forget_classes is None and setup.forget_frac == 0.02
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        random_setup(mnist.y, mnist.train_rows, forget_frac=1.0, seed=0)


def test_ablation_aliases_switch_off_one_component_of_agnostic_mixunlearn() -> None:
    config = method_config("mixunlearn-no-mix", {"omega": 10}, seed=4)
    assert isinstance(config, MixUnlearnConfig)
    assert config.label_agnostic and not config.use_mix_loss and config.use_real_loss
    assert config.omega == 10 and config.seed == 4


def test_report_gaps_are_to_retrain_mean() -> None:
    def record(method: str, seed: int, test_r: float, test_f: float, asr: float) -> dict[str, object]:
        metrics = dict(train_r=99.0, train_f=0.0, test=90.0, test_r=test_r, test_f=test_f, asr=asr)
        return dict(
            method=method, setup="class", seed=seed, dataset="d", forget_size=5, metrics=metrics, wall_s=1.0
        )

    records = [record("retrain", 0, 98.0, 0.0, 30.0), record("retrain", 1, 99.0, 0.0, 32.0)]
    records += [record("x", 0, 97.0, 2.0, 40.0), record("x", 1, 98.0, 4.0, 40.0)]
    (group,) = summarise(records)
    retrain, other = group.methods
    assert retrain.mean_gap == 0.0
    assert other.gaps == {"test_r": 1.0, "test_f": 3.0, "asr": 9.0} and other.mean_gap == pytest.approx(
        13 / 3
    )


def test_cli_tiny_run_writes_documented_records(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--dataset", "digits", "--methods", "original,retrain", "--seeds", "1"]
    args += ["--set", "initial.epochs=1", "--set", "retrain.epochs=1", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["original", "retrain"]
    for record in records:
        assert set(record) == RECORD_FIELDS
        assert set(record["metrics"]) == {"train_r", "train_f", "test", "test_r", "test_f", "asr"}
        assert record["setup"] == "class" and record["dataset"] == "digits" and record["seed"] == 0
        assert record["forget_size"] == 125  # class 0's training rows
        parts = record["asr_parts"]
        assert record["metrics"]["asr"] == pytest.approx(
            (parts["forget_called_member"] + parts["heldout_called_nonmember"]) / 2
        )
    original, retrain = records
    assert retrain["time_ratio"] == 1.0 and retrain["config"]["epochs"] == 1
    assert original["config"]["epochs"] == 1 and original["wall_s"] == 0.0
    assert len(list((tmp_path / "cache").glob("digits-*-seed0.safetensors"))) == 1


def test_cli_first_seed_runs_disjoint_seeds(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--dataset",
        "digits",
        "--methods",
        "original,finetune",
        "--seeds",
        "2",
        "--first-seed",
        "3",
    ]
    args += [
        "--set",
        "initial.epochs=1",
        "--set",
        "finetune.epochs=1",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main([*args, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["method"], r["seed"]) for r in records] == [
        ("original", 3), ("finetune", 3), ("original", 4), ("finetune", 4)
    ]  # fmt: skip
    assert [r["config"]["seed"] for r in records if r["method"] == "finetune"] == [3, 4]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "original,nope"], "known: original, retrain"),
        (["--setup", "random", "--forget-frac", "0"], "in (0, 1)"),
        (["--forget-frac", "0.1"], "--setup random only"),
        (["--set", "mixunlearn.omega=1", "--methods", "retrain"], "not among --methods"),
        (["--set", "retrain.nope=1", "--methods", "retrain"], "unknown config field"),
        (["--first-seed", "-1"], "--first-seed must be at least 0"),
    ],
)
def test_cli_rejects_bad_arguments(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--dataset", "digits", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
