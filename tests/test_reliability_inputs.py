"""Issue 13, part A: bad inputs that used to give wrong results or tracebacks.

Each case runs the CLI's ``main`` and checks the promise of the README: exit code 2, one
line on stderr, no traceback, nothing written. The classes are those of the issue:
1 (weights that do not match the config), 2 (pickles), 5 (recipes), 6 (scores and plans
of another model), 7 (duplicates, encodings, usage errors, devices).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import one_line_error, tiny_model, tiny_tokenizer

from depthprune.cli import main
from depthprune.errors import ModelLoadError

CALIB = "the quick brown fox jumps over the lazy dog and the cat sat on the mat. " * 40


def _save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rel")


@pytest.fixture(scope="module")
def llama(root: Path) -> Path:
    """A tiny 4-layer Llama folder with a tokenizer."""
    return _save(tiny_model("llama"), root / "llama")


@pytest.fixture(scope="module")
def calib(root: Path) -> Path:
    path = root / "calib.txt"
    path.write_text(CALIB, encoding="utf-8")
    return path


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run the CLI; assert exit 2, one stderr line holding ``needles``, no traceback."""
    return one_line_error(main(argv), capsys, *needles)


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def _copy_with_config(src: Path, dst: Path, **config: Any) -> Path:
    """A copy of a model folder whose config.json has ``config`` changed."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / "config.json").read_text())
    doc.update(config)
    (dst / "config.json").write_text(json.dumps(doc))
    return dst


# --------------------------------------------------------------------------- class 1


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        # More layers than the weights hold: transformers would initialise two at random.
        ({"num_hidden_layers": 6}, "missing from the weights"),
        # Fewer: two layers of weights would be dropped without a word.
        ({"num_hidden_layers": 2}, "in the weights but not in the model"),
        ({"intermediate_size": 48}, "of another shape"),
    ],
)
def test_weights_that_do_not_match_the_config_are_refused(
    change: dict[str, int], needle: str, llama: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _copy_with_config(llama, tmp_path / "bad", **change)
    out = tmp_path / "scores.json"
    argv = ["score", str(bad), "--data", str(calib), "--samples", "2", "--seq-len", "8", "--metrics", "cosine", "-o", str(out)]
    _fails(argv, capsys, "do not match its config.json", needle)
    _no_output(out)
    out = tmp_path / "pruned"
    _fails(["prune", str(bad), "--remove", "block.1", "-o", str(out)], capsys, "do not match its config.json")
    _no_output(out)


def test_eval_and_load_refuse_mismatched_weights(llama: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import depthprune

    bad = _copy_with_config(llama, tmp_path / "bad", num_hidden_layers=6)
    _fails(["eval", str(bad), "--task", f"ppl:{calib},seq_len=8"], capsys, "missing from the weights")
    with pytest.raises(ModelLoadError, match="missing from the weights"):
        depthprune.load(bad)


def test_tied_embeddings_are_not_missing(tmp_path: Path) -> None:
    """lm_head tied to the token embedding is stored once; that is not a missing weight."""
    from depthprune.loading import load_model

    folder = _save(tiny_model("llama", tie_word_embeddings=True), tmp_path / "tied")
    lm = load_model(folder)
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()


# --------------------------------------------------------------------------- class 2


class _Payload:
    """Unpickling this runs ``os.system``: a stand-in for a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _hostile_pickle(path: Path, marker: Path) -> Path:
    with path.open("wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, fh)
    return path


def test_the_hostile_pickle_is_live(tmp_path: Path) -> None:
    """The payload below does run code when unpickled, so its absence means something."""
    marker = tmp_path / "ran"
    path = _hostile_pickle(tmp_path / "p.bin", marker)
    pickle.loads(path.read_bytes())  # our own file
    assert marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_weights_are_refused_unread(
    name: str, llama: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(llama, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    _hostile_pickle(folder / name, marker)
    out = tmp_path / "out"
    _fails(["prune", str(folder), "--remove", "block.1", "-o", str(out)], capsys, "pickle weights", name, "safetensors")
    _fails(
        ["score", str(folder), "--data", str(calib), "--samples", "2", "--seq-len", "8", "-o", str(tmp_path / "s.json")],
        capsys,
        "pickle weights",
    )
    assert not marker.exists()
    _no_output(out)


def test_sharded_pickle_index_is_refused(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(llama, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    _hostile_pickle(folder / "pytorch_model-00001-of-00001.bin", marker)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    _fails(["prune", str(folder), "--remove", "block.1", "-o", str(tmp_path / "out")], capsys, "pickle weights")
    assert not marker.exists()


def test_safetensors_beside_a_pickle_are_loaded_and_the_pickle_never_read(llama: Path, tmp_path: Path) -> None:
    import depthprune
    from depthprune.loading import load_model

    folder = tmp_path / "both"
    shutil.copytree(llama, folder)
    marker = tmp_path / "ran"
    _hostile_pickle(folder / "pytorch_model.bin", marker)
    lm = load_model(folder)
    assert lm.n_layers == 4
    depthprune.load(folder)
    assert not marker.exists()


# --------------------------------------------------------------------------- class 7


def test_duplicate_units_are_refused(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _fails(["prune", str(llama), "--remove", "block.1,block.1", "-o", str(out)], capsys, "block.1 is given twice")
    _no_output(out)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_latin1_calibration_file(suffix: str, llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / f"latin1{suffix}"
    head = '{"text": "caf' if suffix == ".jsonl" else "caf"
    data.write_bytes(head.encode() + "é au lait\"}\n".encode("latin-1"))
    out = tmp_path / "scores.json"
    line = _fails(
        ["score", str(llama), "--data", str(data), "--samples", "2", "--seq-len", "8", "-o", str(out)],
        capsys,
        str(data),
        "not UTF-8",
        f"offset {len(head)}",
    )
    assert "0xe9" in line
    _no_output(out)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["score", "m", "--data", "d", "-o", "o", "--samples", "abc"], "argument --samples: invalid int value: 'abc'"),
        (["prune", "m", "--remove", "block.1", "-o", "o", "--bogus"], "unrecognized arguments: --bogus"),
        (["prune", "m", "--remove", "block.1"], "the following arguments are required: -o/--output"),
        (["prune", "m", "--format", "onnx", "-o", "o"], "invalid choice: 'onnx'"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
        (["plan"], "the following arguments are required"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(argv, capsys, needle)
    assert "--help" in line


@pytest.mark.parametrize(
    ("device", "needle"),
    [
        ("gpu", "is not a torch device"),
        ("cuda:7", "is not available on this machine"),
        ("cuda", "is not available on this machine"),
    ],
)
def test_device_is_checked_once(
    device: str, needle: str, llama: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if device.startswith("cuda") and torch.cuda.is_available() and (device == "cuda" or torch.cuda.device_count() > 7):
        pytest.skip("this machine has that device")
    out = tmp_path / "scores.json"
    argv = ["score", str(llama), "--data", str(calib), "--samples", "2", "--seq-len", "8", "--device", device, "-o", str(out)]
    _fails(argv, capsys, f"device {device!r}", needle)
    _no_output(out)
    run = tmp_path / "run"
    _fails(["run", "--model", str(llama), "--data", str(calib), "--device", device, "-o", str(run)], capsys, needle)
    _no_output(run)


# --------------------------------------------------------------------------- class 5


def _recipe(model: Path, calib: Path, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model": str(model),
        "data": {"source": str(calib), "samples": 2, "seq_len": 8},
        "score": {"metrics": ["cosine"], "units": ["block", "attn"]},
        "plan": {"metric": "cosine", "units": "block", "remove": 1},
        "sweep": {"metrics": ["cosine"], "units": "block", "max_remove": 1},
    }
    for key, value in over.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    return doc


@pytest.mark.parametrize(
    ("over", "needles"),
    [
        ({"data": {"samples": "many"}}, ["data.samples", "'many'", "expected a valid integer"]),
        ({"plan": {"remove": "two"}}, ["plan.remove", "'two'", "expected a valid number"]),
        ({"data": {"samples": 0}}, ["data.samples", "is 0", "greater than or equal to 1"]),
        ({"data": {"seq_len": "32"}}, ["data.seq_len", "'32'"]),
        ({"plan": {"remove": 1.5}}, ["plan.remove", "1.5", "a count (a whole number >= 1) or a fraction in (0, 1)"]),
        ({"sweep": {"units": ["blok"]}}, ["sweep.units", "'blok'"]),
        ({"recover": "lowrank"}, ["recover", "'lowrank'", "lowrank:R"]),
        ({"report": "yes"}, ["report", "'yes'", "boolean"]),
        ({"findings": {"max_fractio": 0.3}}, ["unknown key 'max_fractio' in findings", "Did you mean: max_fraction?"]),
        # Known only once the model's config is read: checked before the run folder exists.
        ({"sweep": {"max_remove": 9}}, ["max_remove 9 is more than the model's 4 block units", "at most 3"]),
        ({"sweep": {"units": "attn", "max_remove": 5}}, ["max_remove 5 is more than the model's 4 attn units"]),
        ({"sweep": {"max_remove": 4}}, ["would remove every block of 4"]),
        ({"plan": {"remove": 4}}, ["plan.remove 4 block units cannot be met", "at most 3"]),
        ({"plan": {"remove": 3, "keep_first": 2}}, ["plan.remove 3 block units cannot be met", "at most 2"]),
    ],
)
def test_bad_recipes_are_refused_before_anything_is_written(
    over: dict[str, Any], needles: list[str], llama: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(llama, calib, **over)), encoding="utf-8")
    out = tmp_path / "run"
    _fails(["run", str(path), "-o", str(out)], capsys, *needles)
    _no_output(out)


def test_recipe_that_is_not_utf8(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "recipe.yaml"
    head = f"model: {llama}\ndata: {{source: caf"
    path.write_bytes(head.encode() + "é.txt}\n".encode("latin-1"))
    out = tmp_path / "run"
    _fails(["run", str(path), "-o", str(out)], capsys, str(path), "not UTF-8", f"offset {len(head.encode())}")
    _no_output(out)


def test_a_good_recipe_keeps_its_values(llama: Path, calib: Path) -> None:
    from depthprune.recipe import recipe_from_dict

    recipe = recipe_from_dict(_recipe(llama, calib, sweep={"units": ["attn", "mlp"], "max_remove": 0.5}))
    assert (recipe.data.samples, recipe.plan.remove, recipe.sweep.units, recipe.sweep.max_remove) == (2, 1, ["attn", "mlp"], 0.5)
    assert recipe.to_dict()["data"] == {"source": str(calib), "samples": 2, "seq_len": 8, "seed": 0, "text_field": "text"}


# --------------------------------------------------------------------------- class 6


@pytest.fixture(scope="module")
def made_for_llama(llama: Path, calib: Path, root: Path) -> tuple[Path, Path]:
    """scores.json and plan.json made from the tiny Llama."""
    scores, plan = root / "scores.json", root / "plan.json"
    common = ["--data", str(calib), "--samples", "2", "--seq-len", "8", "-q"]
    assert main(["score", str(llama), *common, "--metrics", "cosine", "--units", "block,attn", "-o", str(scores)]) == 0
    assert main(["plan", str(scores), "--metric", "cosine", "--units", "block", "--remove", "1", "-o", str(plan)]) == 0
    return scores, plan


@pytest.fixture(scope="module")
def other_llama(root: Path) -> Path:
    """Another 4-layer Llama: same unit names, another config (narrower MLP)."""
    return _save(tiny_model("llama", intermediate_size=48), root / "other")


@pytest.fixture(scope="module")
def deeper_llama(root: Path) -> Path:
    return _save(tiny_model("llama", num_hidden_layers=6), root / "deeper")


def test_scores_and_plans_record_the_model(made_for_llama: tuple[Path, Path], llama: Path) -> None:
    from depthprune.identity import config_sha256
    from depthprune.loading import load_config

    want = config_sha256(load_config(str(llama))[0])
    for path in made_for_llama:
        doc = json.loads(path.read_text())
        assert doc["config_sha256"] == want and doc["n_layers"] == 4


def test_config_fingerprint_ignores_how_the_model_was_loaded(llama: Path) -> None:
    from depthprune.identity import config_sha256
    from depthprune.loading import load_config, load_model

    on_disk = config_sha256(load_config(str(llama))[0])
    loaded = load_model(llama, dtype="bfloat16", attn_implementation="eager", load_tokenizer=False)
    assert config_sha256(loaded.model.config) == on_disk
    assert config_sha256({**loaded.model.config.to_diff_dict(), "hidden_size": 64}) != on_disk


@pytest.mark.parametrize("other", ["other_llama", "deeper_llama"])
def test_inputs_made_for_another_model_are_refused(
    other: str, made_for_llama: tuple[Path, Path], calib: Path, tmp_path: Path, request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scores, plan = made_for_llama
    model = str(request.getfixturevalue(other))
    needles = ["was made for", "not for", model, "layers"]
    out = tmp_path / "pruned"
    _fails(["prune", model, "--plan", str(plan), "-o", str(out)], capsys, f"plan file {str(plan)!r}", *needles)
    _no_output(out)
    out = tmp_path / "sweep"
    sweep = ["sweep", model, "--scores", str(scores), "--metrics", "cosine", "--max-remove", "1"]
    _fails([*sweep, "--tasks", f"ppl:{calib},seq_len=8", "-o", str(out)], capsys, "the scores file", *needles)
    _no_output(out)
    out = tmp_path / "cmp.json"
    compare = ["recover-compare", model, "--plan", str(plan), "--data", str(calib), "--n-fit", "2", "--n-eval", "1"]
    _fails([*compare, "--seq-len", "8", "-o", str(out)], capsys, "was made for", model)
    _no_output(out)


def test_inputs_made_for_this_model_are_accepted(made_for_llama: tuple[Path, Path], llama: Path, tmp_path: Path) -> None:
    _, plan = made_for_llama
    assert main(["prune", str(llama), "--plan", str(plan), "-o", str(tmp_path / "pruned"), "-q"]) == 0


def test_old_and_hand_written_documents(llama: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Documents without config_sha256 are checked on their layer count; old scores warn."""
    from depthprune.errors import InputError
    from depthprune.identity import check_made_for
    from depthprune.loading import load_config

    config = load_config(str(llama))[0]
    check_made_for({"remove": ["block.1"]}, config, 4, "plan", "m", "fix")  # by hand: nothing to say
    assert caplog.records == []
    check_made_for({"model": "m", "n_layers": 4, "scores": {}}, config, 4, "scores", "m", "rescore")
    assert "records no config_sha256" in caplog.text
    with pytest.raises(InputError, match="made for 'm', a model with 5 layers"):
        check_made_for({"model": "m", "n_layers": 5, "scores": {}}, config, 4, "scores", "m", "rescore")


def test_device_index_is_checked_against_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with one GPU (faked here: the CI machines have none), cuda:0 is fine and cuda:7 is not."""
    from depthprune.errors import InputError
    from depthprune.loading import LoadConfig, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda") == "cuda" and check_device("cuda:0") == "cuda:0"
    assert LoadConfig("m", device="cpu").device == "cpu" and LoadConfig("m", device="meta").device == "meta"
    with pytest.raises(InputError, match=r"it has 1 cuda device \(cuda:0\.\.cuda:0\)"):
        LoadConfig("m", device="cuda:7")
