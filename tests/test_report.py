"""Score tables and heatmaps; the report's measured-speed comparison."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import tiny_model, tiny_tokenizer
from rich.console import Console

from depthprune.errors import InputError
from depthprune.html_report import ReportData, render
from depthprune.report import (
    _normalized_rows,
    heatmap_figsize,
    plot_heatmap,
    scores_table,
)
from depthprune.speed import (
    NO_DIFFERENCE,
    SpeedConfig,
    Spread,
    compare,
    measure_speed,
    speed_rows,
)
from depthprune.units import Unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scores() -> dict[str, Any]:
    return {
        "model": "tiny/llama",
        "n_layers": 3,
        "scores": {
            "cosine": {"block.0": 0.9, "block.1": 0.2, "block.2": 0.5, "attn.1": 0.05},
            "l1": {"block.0": 3.0, "block.1": 1.0, "block.2": 2.0, "mlp.2": 0.5},
            "flat": {"block.0": 7.0, "block.1": 7.0, "block.2": 7.0},
        },
        "stderr": {"cosine": {"block.1": 0.0123}},
    }


def _rows(table: Any) -> list[list[str]]:
    """The table rendered as text, one list of cells per body row."""
    console = Console(record=True, width=200)
    console.print(table)
    rows = []
    for line in console.export_text().splitlines():
        if line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


def test_table_sorted_by_first_metric_least_important_first() -> None:
    rows = _rows(scores_table(_scores()))
    assert [r[1] for r in rows] == ["attn.1", "block.1", "block.2", "block.0", "mlp.2"]
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "-"]  # mlp.2 has no cosine score
    by_unit = {r[1]: r for r in rows}
    assert by_unit["block.1"][2] == "0.2 ± 0.012"
    assert by_unit["attn.1"][3:] == ["-", "-"]
    assert by_unit["mlp.2"][2:] == ["-", "0.5", "-"]


def test_table_sort_by_and_metric_selection() -> None:
    rows = _rows(scores_table(_scores(), metrics=["cosine"], sort_by="l1"))
    # sort_by is shown first even though it was not asked for; ties keep model order.
    assert [r[1] for r in rows] == ["mlp.2", "block.1", "block.2", "block.0", "attn.1"]
    assert rows[0][2:] == ["0.5", "-"]
    flat = _rows(scores_table(_scores(), metrics=["flat"]))
    assert [r[1] for r in flat] == ["block.0", "block.1", "block.2"]


def test_table_header_and_kinds() -> None:
    scores = _scores()
    scores["scores"]["span"] = {"block.0": 1.0}
    scores["definitions"] = {"span": {"definition": "d", "reference": "r", "span": 2}}
    console = Console(record=True, width=200)
    console.print(scores_table(scores, kinds=["block"]))
    text = console.export_text()
    assert "span (span 2)" in text and "least important first" in text
    assert "attn.1" not in text and "mlp.2" not in text


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"metrics": ["cosin"]}, "Did you mean: cosine?"),
        ({"sort_by": "L1"}, "unknown metric 'L1'"),
        ({"kinds": ["mpl"]}, "Did you mean: mlp?"),
    ],
)
def test_table_errors(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(InputError, match=None) as info:
        scores_table(_scores(), **kwargs)
    assert needle in str(info.value)


def test_normalized_rows() -> None:
    scores = _scores()
    units = [Unit("block", 0), Unit("block", 1), Unit("block", 2), Unit("mlp", 2)]
    cosine, l1, flat = _normalized_rows(scores, ["cosine", "l1", "flat"], units)
    assert cosine[:3] == pytest.approx([1.0, 0.0, 3 / 7])
    assert cosine[3] != cosine[3]  # NaN: missing
    assert l1 == pytest.approx([1.0, 0.2, 0.6, 0.0])
    assert flat[:3] == [0.5, 0.5, 0.5]


def _many_units(n_layers: int) -> dict[str, Any]:
    return {
        "model": "m",
        "n_layers": n_layers,
        "scores": {
            m: {f"{k}.{i}": float((i * 7 + j) % 5) for i in range(n_layers) for k in ("block", "attn", "mlp")}
            for j, m in enumerate(["cosine", "l1", "l2"])
        },
    }


def test_heatmap_writes_png_that_reads_back(tmp_path: Path) -> None:
    import matplotlib.image

    small = plot_heatmap(_scores(), tmp_path / "small.png")
    large = plot_heatmap(_many_units(16), tmp_path / "large.png", metrics=["l2", "cosine"])
    assert large == tmp_path / "large.png"
    for path in (small, large):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    img_small = matplotlib.image.imread(small)
    img_large = matplotlib.image.imread(large)
    # 6 units x 3 metrics, and 48 units x 2 metrics, at 100 dpi.
    w, h = heatmap_figsize(3, 6)
    assert img_small.shape[:2] == (round(h * 100), round(w * 100))
    w, h = heatmap_figsize(2, 48)
    assert img_large.shape[:2] == (round(h * 100), round(w * 100))
    assert img_large.shape[1] / img_large.shape[0] > 4
    assert img_large.shape[1] > 2 * img_small.shape[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.png", "small.png"]


def test_heatmap_replaces_and_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "h.svg"
    path.write_text("old")
    plot_heatmap(_scores(), path)
    assert path.read_text().lstrip().startswith("<?xml")
    assert [p.name for p in tmp_path.iterdir()] == ["h.svg"]


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("h.xyz", {}, "unknown suffix '.xyz'"),
        ("missing/h.png", {}, "does not exist"),
        ("h.png", {"metrics": ["l11"]}, "Did you mean: l1?"),
    ],
)
def test_heatmap_errors(tmp_path: Path, name: str, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(InputError) as info:
        plot_heatmap(_scores(), tmp_path / name, **kwargs)
    assert needle in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- measured speed


def test_spread_is_median_and_interquartile_range() -> None:
    s = Spread.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.low, s.high, s.n) == (3.0, 2.0, 4.0, 5)
    assert Spread.of([7.0]) == Spread(7.0, 7.0, 7.0, 1)
    with pytest.raises(ValueError):
        Spread.of([])


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        # One slow repeat of the pruned model drags its median below the original's, but
        # the ranges overlap: that is noise, not a slower model.
        ([100, 101, 99, 102, 98, 100, 101], [97, 99, 103, 60, 98, 102, 99], NO_DIFFERENCE),
        ([100, 101, 99, 102, 98, 100, 101], [133, 130, 136, 135, 131, 134, 120], "1.33x faster"),
        ([100, 101, 99, 102, 98, 100, 101], [75, 74, 76, 77, 73, 75, 90], "0.75x (slower)"),
        ([100.0], [100.0], NO_DIFFERENCE),
    ],
)
def test_speed_verdict(before: list[float], after: list[float], verdict: str) -> None:
    assert compare(Spread.of(before), Spread.of(after)) == verdict


class _FakeTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> Any:
        return SimpleNamespace(input_ids=list(range(len(text.split()))))


def _fake_model(context: int) -> Any:
    # The context key is a family fact (architectures/llama.json), so the config names its family.
    config = SimpleNamespace(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=context)
    return SimpleNamespace(config=config)


def test_measure_speed_alternates_and_converts_injected_timings() -> None:
    models = {"original": _fake_model(512), "pruned": _fake_model(40)}
    calls: list[tuple[str, int, int]] = []
    seconds = {"original": (0.5, 2.0), "pruned": (0.25, 1.0)}

    def timer(model: Any, prompt: Any, new: int) -> tuple[float, float]:
        name = next(n for n, m in models.items() if m is model)
        calls.append((name, prompt.shape[1], new))
        return seconds[name]

    out = measure_speed(models, _FakeTokenizer(), SpeedConfig(prompt_tokens=64, new_tokens=16, repeats=4), timer=timer)
    # Warm-up once each, then the order flips every repeat so drift hits both alike.
    assert [c[0] for c in calls] == ["original", "pruned"] * 2 + ["pruned", "original", "original", "pruned", "pruned", "original"]
    assert all(c[1:] == (24, 16) for c in calls)  # the prompt fits the shortest context (40 - 16 new)
    assert out["original"]["prefill_tokens_per_second"] == [48.0] * 4
    assert out["pruned"]["decode_tokens_per_second"] == [16.0] * 4
    rows = speed_rows(out["original"], out["pruned"])
    assert [label.split(",")[0] for label, _, _ in rows] == ["prefill", "decode"]
    assert "24-token prompt" in rows[0][0] and "16 tokens on the KV cache" in rows[1][0]
    assert [compare(a, b) for _, a, b in rows] == ["2.00x faster", "2.00x faster"]
    assert speed_rows(None, out["pruned"]) == []  # eval.json from before prefill/decode were measured


def test_measure_speed_runs_a_real_model() -> None:
    out = measure_speed({"m": tiny_model("llama")}, tiny_tokenizer(), SpeedConfig(prompt_tokens=8, new_tokens=3, repeats=2))
    assert out["m"]["prompt_tokens"] == 8 and len(out["m"]["decode_tokens_per_second"]) == 2
    assert all(v > 0 for k in ("prefill_tokens_per_second", "decode_tokens_per_second") for v in out["m"][k])


def test_report_speed_section_says_no_measurable_difference_when_ranges_overlap() -> None:
    steady = Spread.of([100, 101, 99, 102, 98])
    noisy = Spread.of([97, 99, 103, 60, 98])
    fast = Spread.of([150, 151, 149, 152, 148])
    html = render(ReportData(title="t", model="m", throughput=[("prefill, tokens/s", steady, noisy), ("decode, tokens/s", steady, fast)]))
    speed = html[html.index("Speed (measured)") :]
    assert "<td>prefill, tokens/s</td><td>100 <span class=muted>(99&ndash;101)</span></td>" in speed
    assert f"<td>{NO_DIFFERENCE}</td>" in speed
    assert "<td class=better>1.50x faster</td>" in speed
    assert "slower" not in speed
    assert "Median of 5 runs per model" in speed
