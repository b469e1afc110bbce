"""The benchmark harness: built-in datasets, the setups' forget/retain sets, the CLI's JSON and errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.cli import main
from worker.audit.references import ReferenceSet
from worker.bench import runner
from worker.bench.methods import initial_training_config, method_config
from worker.bench.report import format_text, summarise
from worker.bench.setups import build_setup, class_setup, data_setup, noisy_setup, random_setup
from worker.datasets import BuiltinDataset, load_dataset
from worker.engine.config import ConfigError, MixUnlearnConfig
from worker.engine.methods import retrain as retrain_method
from worker.engine.runtime import CPU
from worker.engine.spec import MNIST_CNN_FEATURE_LAYER, mnist_cnn_spec

RECORD_FIELDS = {"method", "setup", "seed", "dataset", "forget_frac", "forget_size", "metrics", "wall_s"}
RECORD_FIELDS |= {"time_ratio", "config", "asr_parts", "shadow_asr_parts", "feature_layer", "confidence"}
METRIC_KEYS = {"train_r", "train_f", "test", "test_r", "test_f", "asr", "shadow_asr"}


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
    args += ["--shadow-models", "2"]
    assert main([*args, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["original", "retrain"]
    for record in records:
        assert record["feature_layer"] == MNIST_CNN_FEATURE_LAYER
        assert set(record) == RECORD_FIELDS
        assert set(record["metrics"]) == METRIC_KEYS
        assert record["setup"] == "class" and record["dataset"] == "digits" and record["seed"] == 0
        assert record["forget_size"] == 125  # class 0's training rows
        for key in ("asr", "shadow_asr"):
            parts = record[f"{key}_parts"]
            assert record["metrics"][key] == pytest.approx(
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
        (["--shadow-models", "-1"], "--shadow-models must be at least 0"),
        (["--steering-references", "3"], "--steering-references must be even and at least 2"),
        (["--feature-layer", "classifier"], "invalid choice: 'classifier'"),
        (["--methods", "original,lmix"], "'lmix' was renamed 'randlabel-mixup'"),
    ],
)
def test_cli_rejects_bad_arguments(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--dataset", "digits", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_shadow_models_zero_skips_the_shadow_attack(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--dataset", "digits", "--methods", "original", "--seeds", "1", "--shadow-models", "0"]
    args += ["--set", "initial.epochs=1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    assert main(args) == 0
    (record,) = json.loads(out.read_text())
    assert record["metrics"]["shadow_asr"] is None and record["shadow_asr_parts"] is None
    assert record["metrics"]["asr"] is not None


# A map, and a vector read as C x 1 x 1 (the default, features.block1, is what every other run reads).
@pytest.mark.parametrize("layer", ["features.block2", "classifier.2"])
def test_feature_layer_option_reaches_the_mixblock(tmp_path: Path, layer: str) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--dataset", "digits", "--methods", "mixunlearn", "--seeds", "1", "--shadow-models", "0"]
    args += [
        "--feature-layer",
        layer,
        "--set",
        "initial.epochs=1",
        "--set",
        "mixunlearn.epochs=1",
    ]
    args += ["--set", "mixunlearn.min_steps=1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    assert main(args) == 0
    (record,) = json.loads(out.read_text())
    assert record["feature_layer"] == layer and record["metrics"]["test"] is not None


def test_report_names_the_attacks_and_the_renamed_method() -> None:
    metrics = dict(train_r=99.0, train_f=0.0, test=90.0, test_r=98.0, test_f=0.0, asr=30.0)
    records = [
        dict(method=name, setup="class", seed=0, dataset="d", forget_size=5, metrics=metrics, wall_s=1.0)
        for name in ("retrain", "lmix")  # "lmix": a record written before the rename
    ]
    (group,) = summarise(records)
    assert [m.method for m in group.methods] == ["retrain", "randlabel-mixup"]
    text = format_text([group])
    assert "pop-MIA ASR" in text and "shadow-MIA ASR" not in text  # no record has the shadow attack
    with_shadow = [{**r, "metrics": {**metrics, "shadow_asr": 55.0}} for r in records]
    assert "shadow-MIA ASR" in format_text(summarise(with_shadow))


def test_bench_refuses_the_old_lmix_name() -> None:
    with pytest.raises(ConfigError, match="'lmix' was renamed 'randlabel-mixup'"):
        method_config("lmix", {}, seed=0)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_retrain_draws_its_own_initialisation_in_the_bench_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench seeds the initial model with the run's seed and hands Retrain the same seed: Retrain's fresh
    model must still start from other weights (its own stream), the same ones on every run of that seed."""
    dataset = load_dataset("digits")
    spec = mnist_cnn_spec(dataset.num_classes, dataset.input_shape)
    plan = runner.BenchPlan(
        dataset="digits", setups=("class",), methods=("original", "retrain"), seeds=1,
        overrides={"retrain": {"epochs": 1}}, cache_dir=tmp_path, shadow_models=0,
    )  # fmt: skip
    run = runner._Run(
        plan=plan, dataset=dataset, x=torch.from_numpy(dataset.x), spec=spec,
        initial_config=initial_training_config({"epochs": 1}), runtime=CPU,
        printer=runner.ProgressPrinter(io.StringIO()),
    )  # fmt: skip
    starts: dict[str, list[dict[str, torch.Tensor]]] = {"initial": [], "retrain": []}

    def spy(key: str, real: Any) -> Any:
        def wrapped(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            starts[key].append(_state(model))  # the weights training starts from
            return real(model, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(runner, "train", spy("initial", runner.train))
    monkeypatch.setattr(retrain_method, "train", spy("retrain", retrain_method.train))
    seed = 3
    setup = build_setup("class", dataset.y, dataset.train_rows, dataset.num_classes, seed=seed)
    initial = run.initial_model(setup, seed)
    first, _, config = run._unlearn(initial, setup, "retrain", seed, "test")
    second, _, _ = run._unlearn(initial, setup, "retrain", seed, "test")
    assert config["seed"] == seed  # Retrain is handed the run's seed ...
    (initial_start,) = starts["initial"]
    retrain_start, retrain_again = starts["retrain"]
    assert _same(initial_start, _state(runner.untrained_initial_model(spec, seed)))
    assert not _same(retrain_start, initial_start)  # ... and still starts elsewhere
    assert _same(retrain_start, retrain_again) and _same(_state(first), _state(second))  # deterministic
    assert _same(retrain_start, _state(retrain_method.fresh_model(spec, seed)))


def test_retrain_streams_differ_from_every_nearby_original_seed() -> None:
    spec = mnist_cnn_spec(10, (1, 8, 8))
    originals = [_state(runner.untrained_initial_model(spec, s)) for s in range(6)]
    for seed in range(5):
        fresh = _state(retrain_method.fresh_model(spec, seed))
        assert not any(_same(fresh, original) for original in originals)  # seed + 1 included
    assert retrain_method.retrain_seed(0) == retrain_method.retrain_seed(0) != 0
    assert len({retrain_method.retrain_seed(s) for s in range(100)} & set(range(100))) == 0


def test_steered_method_aims_at_its_own_steering_references(tmp_path: Path) -> None:
    """calibrated gets its targets from steering references the bench trains once per seed and label set
    (class and noisy labels differ: two sets), out of its timed call, and its record says how many."""
    out = tmp_path / "bench.json"
    args = ["bench", "--dataset", "digits", "--setup", "class,noisy", "--methods", "calibrated"]
    args += ["--seeds", "1", "--shadow-models", "0", "--steering-references", "2"]
    args += ["--set", "initial.epochs=1", "--set", "calibrated.min_steps=2", "--set", "calibrated.epochs=1"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    # Routing off: a whole class is far past the share where calibrated hands over to repair (below).
    assert main([*args, "--set", "calibrated.max_class_share=1.0"]) == 0
    records = json.loads(out.read_text())
    assert [r["setup"] for r in records] == ["class", "noisy"]
    assert all(r["config"]["steering_references"] == 2 for r in records)
    assert all(r["config"]["treatment"] == "matching" for r in records)
    steering = sorted((tmp_path / "cache").glob("digits-*-seed0-steering2.safetensors"))
    assert len(steering) == 2
    built = ReferenceSet.from_bytes(steering[0].read_bytes())
    assert built.steering == built.k == 2  # steering only: nothing the audit could read
    # Every training row is out of one of the two halves' models, so each has a target.
    assert np.isfinite(built.steering_set().targets(built.train_rows)).all()

    # With the default routing, forgetting a whole class runs repair's treatment, steered by nothing.
    for path in steering:
        path.unlink()
    assert main([*args, "--setup", "class"]) == 0
    (record,) = json.loads(out.read_text())
    assert record["config"]["treatment"] == "repair" and "steering_references" not in record["config"]
    assert not list((tmp_path / "cache").glob("*-steering*"))
