"""Plans from scores: selection, budgets, constraints, spans, plan files and prune --plan."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from depthprune import __version__
from depthprune.cli import main
from depthprune.errors import InputError, OutputExistsError
from depthprune.export import read_manifest
from depthprune.plan import (
    PlanConfig,
    format_plan,
    load_plan,
    make_plan,
    parse_budget,
    write_plan,
)
from depthprune.scores_file import load_scores, scores_digest
from depthprune.units import Unit

CALIBRATION = {"source": "text.txt", "n_sequences": 4, "seq_len": 32, "n_tokens": 128, "sha256": "ab" * 32, "seed": 0, "bos": True}


def _scores() -> dict[str, Any]:
    """Six layers; higher = more important. Known order of "cosine" blocks: 2 < 4 = 1 < 3 < 5 < 0."""
    return {
        "model": "tiny/llama",
        "family": "llama",
        "n_layers": 6,
        "calibration": CALIBRATION,
        "scores": {
            "cosine": {
                "block.0": 0.90, "block.1": 0.30, "block.2": 0.10, "block.3": 0.40, "block.4": 0.30, "block.5": 0.60,
                "attn.0": 0.5, "attn.1": 0.05, "attn.2": 0.2, "attn.3": 0.01, "attn.4": 0.3, "attn.5": 0.02,
            },
            "relative_l1": {f"block.{i}": 1.0 for i in range(6)},
            "angular_span": {"block.0": 0.5, "block.1": 0.2, "block.2": 0.4, "block.3": 0.1},
        },
        "stderr": {"cosine": {"block.2": 0.01}},
        "definitions": {
            "cosine": {"definition": "1 - cos(h_in, h_out)", "reference": "arXiv 2407.16286"},
            "angular_span": {"definition": "angular distance over 3 blocks", "reference": "arXiv 2403.17887", "span": 3},
        },
        "meta": {"version": "0.1.0", "seed": 0, "created": "2025-01-01T00:00:00+00:00", "cost": {}},
    }


def _removed(plan: dict[str, Any]) -> list[str]:
    return [e["unit"] for e in plan["remove"]]


@pytest.fixture
def scores_file(tmp_path: Path) -> Path:
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(_scores(), indent=2))
    return path


# --------------------------------------------------------------------------- selection


def test_top_k_lowest_first_with_ties_to_lower_index() -> None:
    plan = make_plan(_scores(), PlanConfig(metric="cosine", remove=3))
    # block.1 and block.4 tie at 0.30: the lower index goes first.
    assert _removed(plan) == ["block.2", "block.1", "block.4"]
    assert [e["rank"] for e in plan["remove"]] == [0, 1, 2]
    assert [e["score"] for e in plan["remove"]] == [0.10, 0.30, 0.30]
    assert all(e["replace"] == "none" for e in plan["remove"])


def test_all_equal_scores_break_ties_by_index() -> None:
    assert _removed(make_plan(_scores(), PlanConfig(metric="relative_l1", remove=2))) == ["block.0", "block.1"]


def test_plan_document_fields() -> None:
    scores = _scores()
    plan = make_plan(scores, PlanConfig(metric="cosine", remove=1, keep_last=1, replace="lowrank:8"))
    assert plan["version"] == __version__
    assert plan["model"] == "tiny/llama" and plan["n_layers"] == 6
    assert plan["remove"] == [{"unit": "block.2", "replace": "lowrank:8", "score": 0.10, "rank": 0}]
    assert plan["provenance"] == {
        "metric": "cosine",
        "units": "block",
        "budget": 1,
        "keep_first": 0,
        "keep_last": 1,
        "scores_sha256": scores_digest(scores),
        "calibration": CALIBRATION,
    }
    assert scores == _scores(), "make_plan must not change its input"


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        (0.1, ["block.2"]),  # 0.6 -> 1
        (0.25, ["block.2", "block.1"]),  # 1.5 rounds half up -> 2
        (0.5, ["block.2", "block.1", "block.4"]),  # 3
        (0.01, ["block.2"]),  # 0.06 -> at least 1
    ],
)
def test_fraction_of_candidates(fraction: float, expected: list[str]) -> None:
    plan = make_plan(_scores(), PlanConfig(metric="cosine", remove=fraction))
    assert _removed(plan) == expected
    assert plan["provenance"]["budget"] == fraction


def test_fraction_counts_candidates_after_keep() -> None:
    # Candidates are blocks 1..4 (4 units); half of them is 2.
    plan = make_plan(_scores(), PlanConfig(metric="cosine", remove=0.5, keep_first=1, keep_last=1))
    assert _removed(plan) == ["block.2", "block.1"]


def test_keep_first_and_last() -> None:
    assert _removed(make_plan(_scores(), PlanConfig(metric="cosine", remove=2, keep_first=3))) == ["block.4", "block.3"]
    assert _removed(make_plan(_scores(), PlanConfig(metric="cosine", remove=2, keep_last=3))) == ["block.2", "block.1"]
    plan = make_plan(_scores(), PlanConfig(metric="cosine", remove=4, keep_first=1, keep_last=1))
    assert _removed(plan) == ["block.2", "block.1", "block.4", "block.3"]


def test_sublayer_kind() -> None:
    plan = make_plan(_scores(), PlanConfig(metric="cosine", units="attn", remove=3))
    assert _removed(plan) == ["attn.3", "attn.5", "attn.1"]
    plan = make_plan(_scores(), PlanConfig(metric="cosine", units="attn", remove=3, keep_last=1))
    assert _removed(plan) == ["attn.3", "attn.1", "attn.2"]
    # Every attention path may go: the MLPs are left.
    assert len(make_plan(_scores(), PlanConfig(metric="cosine", units="attn", remove=6))["remove"]) == 6


def test_span_plan_removes_lowest_allowed_span() -> None:
    plan = make_plan(_scores(), PlanConfig(metric="angular_span"))
    assert _removed(plan) == ["block.3", "block.4", "block.5"]
    assert [e["score"] for e in plan["remove"]] == [0.1, 0.1, 0.1]
    assert plan["provenance"]["span"] == 3 and plan["provenance"]["budget"] is None
    # keep_last=1 forbids the span 3..5; the next best start is 1.
    assert _removed(make_plan(_scores(), PlanConfig(metric="angular_span", remove=1, keep_last=1))) == [
        "block.1",
        "block.2",
        "block.3",
    ]
    # keep_first=2 also forbids start 1; start 2 (0.4) is the only one left with keep_last=1.
    assert _removed(make_plan(_scores(), PlanConfig(metric="angular_span", keep_first=2, keep_last=1))) == [
        "block.2",
        "block.3",
        "block.4",
    ]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        (PlanConfig(metric="cosin", remove=1), ("unknown metric 'cosin'", "Did you mean: cosine?", "Available: cosine, relative_l1")),
        (PlanConfig(metric="cosine", units="mlp", remove=1), ("no scores for mlp units", "block, attn")),
        (PlanConfig(metric="cosine", remove=5, keep_first=1, keep_last=1), ("cannot remove 5 block units", "only 4 candidates")),
        (PlanConfig(metric="cosine", remove=6), ("cannot remove every block", "6 layers")),
        (PlanConfig(metric="cosine", remove=0.95), ("cannot remove every block", "0.95")),
        (PlanConfig(metric="cosine", remove=1, keep_first=4, keep_last=2), ("keep_first=4, keep_last=2", "all of the model's 6")),
        (PlanConfig(metric="cosine"), ("no budget given", "--remove")),
        (PlanConfig(metric="angular_span", remove=2), ("one span", "remove 2")),
        (PlanConfig(metric="angular_span", remove=0.5), ("one span", "remove 0.5")),
        (PlanConfig(metric="angular_span", units="attn"), ("spans of 3 blocks", "--units block")),
        (PlanConfig(metric="angular_span", keep_first=4), ("no span of 3 blocks fits", "keep_first=4")),
    ],
)
def test_make_plan_errors(config: PlanConfig, needles: tuple[str, ...]) -> None:
    with pytest.raises(InputError) as info:
        make_plan(_scores(), config)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"remove": 0}, "remove 0 is invalid"),
        ({"remove": -2}, "remove -2 is invalid"),
        ({"remove": 1.5}, "remove fraction 1.5 is out of range"),
        ({"remove": 1.0}, "remove fraction 1.0 is out of range"),
        ({"remove": 0.0}, "remove fraction 0.0 is out of range"),
        ({"remove": True}, "remove True is invalid"),
        ({"remove": "2"}, "remove '2' is invalid"),
        ({"keep_first": -1}, "keep_first -1 is invalid"),
        ({"keep_last": -3}, "keep_last -3 is invalid"),
        ({"units": "blocks"}, "unknown unit kind 'blocks'. Did you mean: block?"),
        ({"replace": "lowrank"}, "unknown replace 'lowrank'"),
        ({"replace": "lowrank:0"}, "unknown replace 'lowrank:0'"),
        ({"replace": "biass"}, "unknown replace 'biass'"),
        ({"metric": ""}, "metric '' is not a metric name"),
    ],
)
def test_config_validation_repeats_bad_value(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(InputError, match=None) as info:
        PlanConfig(**{"metric": "cosine", "remove": 1, **kwargs})
    assert needle in str(info.value)


@pytest.mark.parametrize(("text", "value"), [("3", 3), (" 1 ", 1), ("0.25", 0.25), (".5", 0.5)])
def test_parse_budget(text: str, value: float) -> None:
    parsed = parse_budget(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["two", "1.5", "0", "-1", "nan", "inf", "1.0"])
def test_parse_budget_errors(text: str) -> None:
    with pytest.raises(InputError, match="remove"):
        parse_budget(text)


def test_non_finite_score_is_an_error() -> None:
    scores = _scores()
    scores["scores"]["cosine"]["block.3"] = float("nan")
    with pytest.raises(InputError, match="score of cosine for block.3 is nan"):
        make_plan(scores, PlanConfig(metric="cosine", remove=1))


# --------------------------------------------------------------------------- scores files


def test_load_scores_and_digest(scores_file: Path) -> None:
    loaded = load_scores(scores_file)
    assert loaded == _scores()
    timeless = _scores()
    del timeless["meta"]["created"]
    expected = hashlib.sha256(json.dumps(timeless, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert scores_digest(loaded) == expected


def test_digest_ignores_creation_time_only() -> None:
    """The same numbers made at another time give the same plan (class 8 of issue 13);
    any other change, however small, gives another digest."""
    a, b = _scores(), _scores()
    b["meta"]["created"] = "2031-06-30T12:00:00+00:00"
    assert scores_digest(a) == scores_digest(b)
    cfg = PlanConfig(metric="cosine", units="block", remove=1)
    assert make_plan(a, cfg) == make_plan(b, cfg)
    c = _scores()
    metric = next(iter(c["scores"]))
    unit = next(iter(c["scores"][metric]))
    c["scores"][metric][unit] = float(c["scores"][metric][unit]) + 1e-12
    assert scores_digest(c) != scores_digest(a)


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (None, ("does not exist", "depthprune score")),
        ("{not json", ("is not valid JSON", "line 1")),
        ("[1, 2]", ("JSON list", "model, n_layers, scores")),
        (json.dumps({"model": "m", "n_layers": 2}), ("no 'scores' key",)),
        (json.dumps({"model": "m", "scores": {}}), ("no 'n_layers' key",)),
        (json.dumps({"model": "m", "n_layers": 0, "scores": {}}), ("n_layers is 0",)),
        (json.dumps({"model": "m", "n_layers": 2, "scores": {"c": {"block.2": 1.0}}}), ("block.2", "out of range")),
        (json.dumps({"model": "m", "n_layers": 2, "scores": {"c": {"blok.1": 1.0}}}), ("Did you mean: block?",)),
        (json.dumps({"model": "m", "n_layers": 2, "scores": {"c": {"block.1": "x"}}}), ("score of c for block.1 is 'x'",)),
    ],
)
def test_load_scores_errors(tmp_path: Path, content: str | None, needles: tuple[str, ...]) -> None:
    path = tmp_path / "scores.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as info:
        load_scores(path)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    if content is not None:
        assert str(path) in str(info.value)


def test_load_scores_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is not a file"):
        load_scores(tmp_path)


# --------------------------------------------------------------------------- plan files


def test_write_load_round_trip(tmp_path: Path) -> None:
    plan = make_plan(_scores(), PlanConfig(metric="cosine", remove=2, replace="bias"))
    path = write_plan(plan, tmp_path / "plan.json")
    assert json.loads(path.read_text()) == plan
    assert load_plan(path, 6) == [(Unit("block", 2), "bias"), (Unit("block", 1), "bias")]
    with pytest.raises(OutputExistsError, match="--force"):
        write_plan(plan, path)
    other = make_plan(_scores(), PlanConfig(metric="cosine", remove=1))
    write_plan(other, path, force=True)
    assert load_plan(path, 6) == [(Unit("block", 2), "none")]
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_hand_written_minimal_plan(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"remove": [{"unit": "block.3"}, {"unit": "mlp.1", "replace": "lowrank:4"}, "attn.0"]}))
    assert load_plan(path, 4) == [(Unit("block", 3), "none"), (Unit("mlp", 1), "lowrank:4"), (Unit("attn", 0), "none")]


@pytest.mark.parametrize(
    ("doc", "needles"),
    [
        ({"units": ["block.1"]}, ("no 'remove' key",)),
        ({"remove": []}, ("non-empty list",)),
        ({"remove": [{"replace": "none"}]}, ("remove[0]", "\"unit\"")),
        ({"remove": [{"unit": "block.9"}]}, ("out of range", "4 layers")),
        ({"remove": [{"unit": "blk.1"}]}, ("unknown unit kind 'blk'",)),
        ({"remove": [{"unit": "block.1", "replace": "zero"}]}, ("unknown replace 'zero' for block.1", "lowrank:R")),
        ({"remove": [{"unit": "block.1"}, {"unit": "block.2"}, {"unit": "block.1"}]}, ("block.1 is listed twice", "remove[0] and remove[2]")),
        ({"remove": [{"unit": "block.1"}, {"unit": "attn.1"}]}, ("attn.1 is already removed with the whole block",)),
        ({"n_layers": 32, "remove": [{"unit": "block.1"}]}, ("made for a model with 32 layers", "this one has 4")),
    ],
)
def test_load_plan_errors(tmp_path: Path, doc: dict[str, Any], needles: tuple[str, ...]) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError) as info:
        load_plan(path, 4)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message


def test_load_plan_missing_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_plan(tmp_path / "nope.json", 4)
    bad = tmp_path / "bad.json"
    bad.write_text('{"remove": [')
    with pytest.raises(InputError, match="not valid JSON"):
        load_plan(bad, 4)


def test_format_plan() -> None:
    text = format_plan(make_plan(_scores(), PlanConfig(metric="cosine", remove=2, keep_last=1)))
    lines = text.splitlines()
    assert lines[0] == "plan for tiny/llama (6 layers): remove 2 units"
    assert "metric 'cosine'" in lines[1] and "keep_last=1" in lines[1]
    assert lines[3].split() == ["0", "block.2", "0.1", "none"]
    assert lines[4].split() == ["1", "block.1", "0.3", "none"]
    assert lines[-1].strip() == "keeps 4 of 6 blocks"
    # A hand-written plan has no provenance, scores or layer count.
    minimal = format_plan({"remove": [{"unit": "block.1"}]})
    assert "block.1" in minimal and "-" in minimal


# --------------------------------------------------------------------------- CLI


def test_cli_plan_writes_and_dry_run_prints(scores_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    argv = ["plan", str(scores_file), "--metric", "cosine", "--remove", "0.5", "--keep-first", "1", "--keep-last", "1"]
    assert main([*argv, "-o", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "block.2" in printed and "block.1" in printed and "keeps 4 of 6 blocks" in printed
    assert not out.exists()
    assert main([*argv, "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"plan: remove block.2, block.1 (lowest cosine); wrote {out}"
    plan = json.loads(out.read_text())
    assert plan == make_plan(load_scores(scores_file), PlanConfig(metric="cosine", remove=0.5, keep_first=1, keep_last=1))
    assert plan["provenance"]["budget"] == 0.5
    assert main([*argv, "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "-o", str(out), "--force"]) == 0


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--metric", "cosin", "--remove", "1"], ("unknown metric 'cosin'", "Did you mean: cosine?")),
        (["--metric", "cosine", "--remove", "two"], ("remove 'two' is not a number",)),
        (["--metric", "cosine", "--remove", "1", "--keep-first", "-1"], ("keep_first -1 is invalid",)),
        (["--metric", "cosine", "--remove", "1", "--replace", "lowrank:x"], ("unknown replace 'lowrank:x'",)),
        (["--metric", "cosine", "--remove", "9"], ("cannot remove 9 block units",)),
    ],
)
def test_cli_plan_errors(
    scores_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needles: tuple[str, ...]
) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", str(scores_file), *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("depthprune: error: ")
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists()


def test_cli_plan_needs_output_unless_dry_run(scores_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(scores_file), "--metric", "cosine", "--remove", "1"]) == 2
    assert "pass -o plan.json" in capsys.readouterr().err
    assert main(["plan", str(scores_file), "--metric", "angular_span", "--dry-run"]) == 0
    assert "block.3" in capsys.readouterr().out


# --------------------------------------------------------------------------- prune --plan


def _tiny_plan(tmp_path: Path, remove: list[dict[str, Any]], **extra: Any) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"n_layers": 4, "remove": remove, **extra}))
    return path


def test_prune_with_plan_end_to_end(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores = copy.deepcopy(_scores())
    scores["n_layers"] = 4
    scores["scores"] = {"cosine": {"block.0": 0.9, "block.1": 0.2, "block.2": 0.1, "block.3": 0.8}}
    scores["definitions"] = {}
    plan = make_plan(scores, PlanConfig(metric="cosine", remove=2))
    assert _removed(plan) == ["block.2", "block.1"]
    plan_path = write_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dirs["llama"]), "--plan", str(plan_path), "-o", str(out)]) == 0
    assert "removed block.1, block.2: 4 -> 2 layers" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest is not None
    assert manifest["plan"] == plan
    assert manifest["removed"] == sorted(_removed(plan), key=lambda u: Unit.parse(u))
    assert manifest["index_map"]["layers"] == {"0": 0, "1": None, "2": None, "3": 1}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_prune_plan_dry_run_writes_nothing(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan_path = _tiny_plan(tmp_path, [{"unit": "block.3"}])
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dirs["llama"]), "--plan", str(plan_path), "-o", str(out), "--dry-run"]) == 0
    assert "would remove block.3: 4 -> 3 layers" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--remove", "block.1", "--plan", "PLAN"], ("both --remove and --plan",)),
        ([], ("nothing to remove", "--plan plan.json")),
        (["--plan", "MISSING"], ("plan file", "does not exist")),
    ],
)
def test_prune_needs_exactly_one_of_remove_and_plan(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needles: tuple[str, ...]
) -> None:
    plan_path = _tiny_plan(tmp_path, [{"unit": "block.1"}])
    args = [str(plan_path) if a == "PLAN" else str(tmp_path / "missing.json") if a == "MISSING" else a for a in args]
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dirs["llama"]), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("remove", "extra", "needles"),
    [
        ([{"unit": "block.1", "replace": "bias"}], {}, ("block.1 -> bias", "must be fitted on calibration data", "--data")),
        ([{"unit": "attn.1", "replace": "lowrank:0"}], {}, ("lowrank:0",)),
        ([{"unit": f"block.{i}"} for i in range(4)], {}, ("cannot remove every block",)),
        ([{"unit": "block.1"}], {"n_layers": 6}, ("made for a model with 6 layers", "with 4 layers")),
    ],
)
def test_prune_plan_errors(
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    remove: list[dict[str, Any]],
    extra: dict[str, Any],
    needles: tuple[str, ...],
) -> None:
    plan_path = _tiny_plan(tmp_path, remove, **extra)
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dirs["llama"]), "--plan", str(plan_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists()
