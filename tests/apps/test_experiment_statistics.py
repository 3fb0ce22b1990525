"""Seed statistics, calibration checks and the report's interval tables, on hand-made rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clair_flower.server_apps import experiments
from clair_flower.server_apps.experiments import calibration
from clair_flower.server_apps.experiments.rows import train_plateau_gain
from clair_flower.server_apps.run_config import ConfigError, RunConfig


def test_mean_ci_is_students_t_interval() -> None:
    ci = experiments.mean_ci([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.3027; sd = 1; half-width = 4.3027 / sqrt(3)
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    single = experiments.mean_ci([0.5, None, float("nan")])
    assert single.n == 1 and single.lo is None and single.text() == "0.500"
    assert experiments.mean_ci([None]) is None


def test_paired_ci_uses_common_seeds_and_removes_the_shared_seed_effect() -> None:
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 0.1, size=6)
    a = {s: 0.6 + seed_effect[s] + rng.normal(0, 0.005) for s in range(6)}
    b = {s: 0.55 + seed_effect[s] + rng.normal(0, 0.005) for s in range(5)}  # seed 5 missing
    paired = experiments.paired_ci(a, b)
    assert paired.n == 5 and paired.excludes_zero() and paired.mean == pytest.approx(0.05, abs=0.01)
    unpaired = experiments.mean_ci(a.values())
    assert paired.half_width < unpaired.half_width / 5


def _row(strategy: str, seed: int, acc: float, attack: str = "reversed", **extra: object) -> dict[str, object]:
    return {"cell": f"{strategy}__{attack}__s{seed}", "status": "done", "protocol": "rounds", "planted": False,
            "strategy": strategy, "attack": attack, "attack-fraction": 0.3, "lora-rank": 4, "seed": seed,
            "num-nodes": 10, "model-width": 128, "num-server-rounds": 3, "local-steps": 20, "optimizer": "adamw",
            "final-benign-token-acc": acc, **extra}


def _config(damage: float, plateau: float, attack: str = "reversed") -> list[dict[str, object]]:
    rows = []
    for s in range(5):
        jitter = 0.01 * s
        rows += [_row("local", s, 0.60 + jitter, attack, **{"train-plateau-gain": plateau}),
                 _row("oracle", s, 0.70 + jitter, attack),
                 _row("fedavg", s, 0.70 - damage + jitter, attack, **{"final-backdoor-asr": 0.2}),
                 _row("clair", s, 0.66 + jitter, attack, **{"final-tpr": 1.0, "final-fpr": 0.0})]
    return rows


def test_calibration_passes_and_fails_each_check_on_its_own_threshold() -> None:
    good = calibration.calibrate(_config(damage=0.10, plateau=0.0))
    assert good.failed == [] and good.mark == ""
    weak = calibration.calibrate(_config(damage=0.01, plateau=0.0))
    assert weak.failed == ["attack"]
    unconverged = calibration.calibrate(_config(damage=0.10, plateau=0.05))
    assert unconverged.failed == ["converged"]
    backdoor = calibration.calibrate(_config(damage=0.10, plateau=0.0, attack="backdoor"))
    assert backdoor.failed == ["attack"]  # success 0.2 under FedAvg, whatever the accuracy gap
    no_oracle = calibration.calibrate([r for r in _config(0.1, 0.0) if r["strategy"] != "oracle"])
    assert {c.name: c.passed for c in no_oracle.checks} == {"converged": True, "collaboration": None,
                                                             "attack": None}


def test_report_marks_failing_configurations_and_takes_the_worst_case_over_hurting_attacks() -> None:
    rows = _config(damage=0.10, plateau=0.0) + _config(damage=0.01, plateau=0.0, attack="sign-flip")
    for r in rows:  # CLAIR does worst under the attack that does not hurt FedAvg
        if r["strategy"] == "clair" and r["attack"] == "sign-flip":
            r["final-benign-token-acc"] = float(r["final-benign-token-acc"]) - 0.2  # type: ignore[arg-type]
    grid = experiments.Grid("t", [], 0.3, 4, [])
    md = experiments.results_markdown(rows, grid)
    table = md.split("method x attack")[1].split("###")[0]
    clair_line = next(line for line in table.splitlines() if line.startswith("| clair"))
    assert clair_line.count("[fails: attack]") == 1  # the sign-flip column only
    worst = md.split("Worst case over attacks")[1].split("###")[0]
    clair_worst = next(line for line in worst.splitlines() if line.startswith("| clair"))
    cells = [c.strip() for c in clair_worst.strip("|").split("|")]
    assert cells[2] == "sign-flip" and cells[4] == "reversed"
    paired = md.split("### Paired differences")[1].split("###")[0]
    assert "better" in paired and "worse" in paired  # vs local (+0.06) and vs oracle (-0.04) on reversed


def test_plateau_gain_reads_the_last_quarter_and_the_last_round() -> None:
    rounds = [{"train-token-acc": 0.5, "train-token-acc-q3": 0.4}, {"train-token-acc": 0.8, "train-token-acc-q3": 0.79}]
    assert train_plateau_gain(rounds) == pytest.approx(0.3)
    assert train_plateau_gain(rounds[1:]) == pytest.approx(0.01)
    assert train_plateau_gain([{"benign-token-acc": 0.5}]) is None


@pytest.mark.parametrize("changes, match", [
    ({"protocol": "one-shot"}, "num-server-rounds = 1"),
    ({"protocol": "one-shot", "num-server-rounds": 1, "strategy": "rolora"}, "alternates A and B"),
    ({"protocol": "one-shot", "num-server-rounds": 1, "attack-start-round": 2}, "attack-start-round"),
    ({"protocol": "one shot"}, "protocol must be one of rounds, one-shot"),
])
def test_one_shot_protocol_is_validated_with_a_readable_error(changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(changes)
    assert RunConfig.from_mapping({"protocol": "one-shot", "num-server-rounds": 1}).protocol == "one-shot"


def test_a_clair_axis_makes_a_method_variant_not_a_configuration(tmp_path) -> None:  # noqa: ANN001
    from clair_flower.server_apps.experiments.rows import cell_row
    from clair_flower.server_apps.experiments.tables import is_flagging

    text = ('name = "v"\nnum-nodes = 3\n[[grid]]\nstrategy = ["clair"]\nattack = ["random"]\n'
            'attack-fraction = [0.3]\nclair-downlink = ["merged-delta"]\ndirichlet-alpha = [10.0]\n')
    (tmp_path / "g.toml").write_text(text)
    cell = experiments.load_grid(tmp_path / "g.toml", tmp_path).cells[0]
    row = cell_row(cell, tmp_path)
    assert row["strategy"] == "clair (clair-downlink=merged-delta)" and row["base-strategy"] == "clair"
    assert is_flagging(row)
    assert calibration.other_axes(row) == "dirichlet-alpha=10"  # the variant is not part of it
    rows = _config(damage=0.1, plateau=0.0)
    rows += [{**r, "strategy": "clair (clair-downlink=merged-delta)", "base-strategy": "clair",
              "final-benign-token-acc": float(r["final-benign-token-acc"]) + 0.02}  # type: ignore[arg-type]
             for r in rows if r["strategy"] == "clair"]
    md = experiments.results_markdown(rows, experiments.Grid("t", [], 0.3, 4, []))
    paired = md.split("### Paired differences")[1].split("###")[0]
    assert "| reversed | clair (clair-downlink=merged-delta) | +0.080" in paired
