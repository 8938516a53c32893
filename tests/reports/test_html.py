"""The HTML report builds from a run directory alone, embeds its figures and renders."""

import base64
import html
import json
import re
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner

from windtunnel.cli import main
from windtunnel.experiments.dissociation import run_dissociation
from windtunnel.experiments.evaluation import evaluate_run
from windtunnel.experiments.telemetry import ablate_run, attach_probes
from windtunnel.presets import apply_overrides, get_preset
from windtunnel.reports import build_report
from windtunnel.reports.html import _text
from windtunnel.runs import read_jsonl, write_json_atomic
from windtunnel.train import Trainer

TINY = ["train.steps=30", "task.n_values=6", "task.n_pairs=5", "model.d_model=16", "model.d_mlp=32",
        "model.n_heads=2", "train.batch_size=16", "train.eval_size=64", "train.eval_batch_size=64",
        "train.eval_every=15", "train.checkpoint_every=15", "train.warmup_steps=5", "train.log_every=5",
        "train.device=cpu"]
SECTIONS = ("Paper numbers beside ours", "Loss and held-out calibration", "Per-position calibration vs Bayes",
            "Value manifold coloured by Bayes entropy", "Key orthogonality", "Frame–precision dissociation",
            "Routing-law telemetry", "Ablations")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    experiment = apply_overrides(get_preset("bijection", "transformer", "cpu"), TINY)
    attach_probes(Trainer(experiment, path), n_sequences=32).fit()
    evaluate_run(path, n_sequences=64, batch_size=64)
    run_dissociation(path, n_sequences=32)
    ablate_run(path, n_sequences=40, batch_size=20)
    return path


def _images(page):
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def test_full_report(full_run):
    result = CliRunner().invoke(main, ["report", str(full_run)])
    assert result.exit_code == 0, result.output
    page = (full_run / "report.html").read_text()
    for section in SECTIONS:
        assert section in page
    images = _images(page)
    assert len(images) == 7  # loss, calibration, manifold, geometry, dissociation, routing law, value updates
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "No eval.json" not in page and "No ablation.json" not in page and "No dissociation.json" not in page
    assert "0.052 vs 0.082 random" in page  # the paper's numbers beside ours
    assert "Value updates: on the training step" in page  # attach_probes watches the value updates


def test_report_reads_only_the_directory(full_run, tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(full_run, copy, ignore=shutil.ignore_patterns("checkpoints", "snapshots"))
    assert len(_images(build_report(copy).read_text())) == 7


def test_minimal_run_dir(tmp_path):
    write_json_atomic(tmp_path / "config.json", {"task_name": "hmm", "model_name": "transformer", "train": {"steps": 1}})
    page = build_report(tmp_path, out=tmp_path / "r.html").read_text()
    assert "No eval.json" in page and "No telemetry.jsonl" in page and "7.5e-5" in page
    assert "No lag response: run <code>windtunnel eval RUN_DIR</code>" in page


def test_hmm_report_has_the_memory_section(tmp_path):
    hmm = ["train.steps=6", "task.n_states=2", "task.n_symbols=3", "task.n_steps=5", "model.n_layers=1",
           "model.d_model=16", "model.d_mlp=32", "model.n_heads=2", "train.batch_size=8", "train.eval_size=20",
           "train.eval_batch_size=20", "train.eval_every=6", "train.checkpoint_every=6", "train.warmup_steps=2",
           "train.log_every=2", "train.device=cpu", "eval_lengths=[]"]
    Trainer(apply_overrides(get_preset("hmm", "transformer", "cpu"), hmm), tmp_path).fit()
    evaluate_run(tmp_path, n_sequences=30)
    page = build_report(tmp_path).read_text()
    assert "Memory: how the belief responds to each earlier observation" in page and "(30 sequences)" in page
    assert "Last panel: each head ablated" not in page and "Left: at each probed step" not in page
    memory_only = len(_images(page))
    ablate_run(tmp_path, n_sequences=20)
    page = build_report(tmp_path).read_text()
    assert "Last panel: each head ablated in turn" in page and len(_images(page)) == memory_only  # one figure, two panels
    CliRunner().invoke(main, ["memory", str(tmp_path), "--n", "10"])
    page = build_report(tmp_path).read_text()
    assert "Every saved model of the run" in page and len(_images(page)) == memory_only + 1


def test_hmm_report_draws_the_memory_probe_over_training(tmp_path):
    hmm = ["train.steps=12", "task.n_states=2", "task.n_symbols=3", "task.n_steps=5", "model.n_layers=1",
           "model.d_model=16", "model.d_mlp=32", "model.n_heads=2", "train.batch_size=8", "train.eval_size=20",
           "train.eval_batch_size=20", "train.eval_every=6", "train.checkpoint_every=6", "train.warmup_steps=2",
           "train.log_every=2", "train.device=cpu", "eval_lengths=[]"]
    attach_probes(Trainer(apply_overrides(get_preset("hmm", "transformer", "cpu"), hmm), tmp_path), n_sequences=16).fit()
    rows = [r for r in read_jsonl(tmp_path / "telemetry.jsonl") if r["metric"] == "model_move_tv_lag1"]
    assert len(rows) >= 3 and all(r["value"] >= 0 for r in rows)
    page = build_report(tmp_path).read_text()
    assert "Left: at each probed step" in page


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        build_report(tmp_path)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "not a run directory" in result.output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_renders_in_headless_chromium(full_run, tmp_path):
    import matplotlib.image

    page = build_report(full_run)
    shot = tmp_path / "report.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--hide-scrollbars", "--window-size=1280,6000", f"--screenshot={shot}", page.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 6000 and float(pixels[..., :3].std()) > 0.05  # not a blank page


def _paper_table(run_dir):
    return build_report(run_dir).read_text().split("Paper numbers beside ours", 1)[1].split("<h2>", 1)[0]


def test_paper_table_falls_back_to_telemetry_then_dissociation(full_run, tmp_path):
    """Without eval.json the geometry rows read the telemetry's last step; without that too, dissociation.json."""
    copy = tmp_path / "no_eval"
    shutil.copytree(full_run, copy, ignore=shutil.ignore_patterns("checkpoints", "snapshots", "eval.*"))
    table = _paper_table(copy)
    assert table.count("(telemetry, last logged step)") == 3 and "(eval.json)" not in table
    copy = tmp_path / "no_eval_no_telemetry"
    shutil.copytree(full_run, copy, ignore=shutil.ignore_patterns("checkpoints", "snapshots", "eval.*", "telemetry.jsonl"))
    page = build_report(copy).read_text()
    assert "No telemetry.jsonl" in page
    assert _paper_table(copy).count("(dissociation.json, final checkpoint)") == 3


def test_paper_table_geometry_is_eval_json_even_with_telemetry(full_run):
    """The report's paper table and `windtunnel eval` give one trained model the same geometry
    numbers: eval.json's first (our) definition of each quantity, not the telemetry's probe batch."""
    assert (full_run / "telemetry.jsonl").exists() and (full_run / "dissociation.json").exists()
    ours = {q: v["value"] for q, variants in json.loads((full_run / "eval.json").read_text())["geometry_variants"]["quantities"].items()
            for v in variants.values() if v.get("ours")}
    table = _paper_table(full_run)
    for quantity in ("key_orthogonality", "value_manifold_pc1_share", "focusing_ratio"):
        assert f"{_text(ours[quantity])} (eval.json)" in table, quantity
    assert "(telemetry, last logged step)" not in table


def _evil(tag):
    """Two markup payloads, told apart by ``tag`` so that each planted field can be found escaped."""
    return f"<script>alert('{tag}')</script>\"><img src=x onerror=alert('{tag}')>"


def _plant_hostile_run(path, task):
    """A run directory written by hand whose names, keys and values are markup payloads."""
    write_json_atomic(path / "config.json", {
        "name": _evil("name"), "task_name": task, "model_name": _evil("model_name"),
        "task": {_evil("task_key"): _evil("task_value")}, "model": {"d_model": _evil("model_value")},
        "train": {"steps": _evil("steps"), "batch_size": _evil("batch_size"), "lr": _evil("lr"), "seed": _evil("seed")},
    })
    curve = {"bayes_entropy_bits": [1.0, 0.5], "model_entropy_bits": [1.1, 0.6], "entropy_mae_bits": [0.1, 0.1], "kl_bits": [0.1, 0.1]}
    summary = {"entropy_mae_bits": _evil("mae"), "kl_bits": _evil("kl"), "accuracy": _evil("accuracy"), "bayes_entropy_bits": 0.5}
    evaluation = {"step": _evil("eval_step"), "n_sequences": _evil("eval_n"), "seed": _evil("eval_seed"),
                  "per_position": {_evil("set"): curve}, "summary": {_evil("set"): summary}}
    if task == "hmm":
        evaluation["lag_response"] = {"lags": [1, 2], "bayes_move_tv": [0.5, 0.2], "model_move_tv": [0.4, 0.1],
                                      "response_error_tv": [0.1, 0.1], "n_sequences": _evil("lag_n")}
    write_json_atomic(path / "eval.json", evaluation)
    write_json_atomic(path / "dissociation.json", {
        "steps": [_evil("first_step"), _evil("last_step")], "settling_step": {_evil("settling"): _evil("settling_step")},
        "frame_settled_by": _evil("frame"), "precision_settled_by": _evil("precision"),
        "frame_settles_first": _evil("first"), "mae_improvement_after_frame": _evil("improvement"),
        "metrics": {"key_ortho_layer0": [_evil("key_ortho")], "focusing_ratio": [_evil("focusing")]},
    })
    row = {"kind": _evil("kind"), "layer": _evil("layer"), "head": _evil("head"), "entropy_mae_bits": _evil("row_mae"),
           "delta_mae_bits": 0.1, "mae_ratio": _evil("ratio"), "delta_kl_bits": _evil("dkl"), "delta_accuracy": _evil("dacc")}
    write_json_atomic(path / "ablation.json", {
        "step": _evil("ablation_step"), "n_sequences": _evil("ablation_n"),
        "intact": {"entropy_mae_bits": _evil("intact_mae"), "accuracy": _evil("intact_accuracy")},
        "rows": [row, {**row, "kind": "bypass", "delta_mae_bits": 0.2, "mae_ratio": _evil("bypass")}],
    })
    telemetry = [{"step": 5, "layer": _evil("tel_layer"), "head": None, "metric": metric, "value": 0.1}
                 for metric in ("key_ortho_abs_cos", "attn_entropy_bits")]
    telemetry.append({"step": 5, "layer": None, "head": None, "metric": "focusing_ratio", "value": 0.9})
    (path / "telemetry.jsonl").write_text("".join(json.dumps(r) + "\n" for r in telemetry), encoding="utf-8")


@pytest.mark.parametrize("task", ["bijection", "hmm", "<script>alert('task')</script>"])
def test_report_escapes_every_value_from_the_run_directory(tmp_path, task):
    _plant_hostile_run(tmp_path, task)
    page = build_report(tmp_path).read_text(encoding="utf-8")
    assert "<script" not in page and "<img src=x" not in page  # nothing planted is markup
    tags = ["name", "model_name", "task_key", "task_value", "model_value", "steps", "batch_size", "lr", "seed",
            "eval_step", "eval_n", "eval_seed", "set", "kl", "accuracy", "first_step", "last_step", "settling",
            "settling_step", "frame", "precision", "first", "improvement", "ablation_step", "ablation_n", "intact_mae",
            "intact_accuracy", "kind", "layer", "head", "row_mae", "ratio", "dkl", "dacc", "tel_layer"]
    tags += {"bijection": ["mae", "key_ortho", "bypass"], "hmm": ["mae", "lag_n"]}.get(task, [])
    for tag in tags:  # each planted value is on the page, as text
        assert html.escape(f"<script>alert('{tag}')</script>") in page, tag
    assert html.escape(_evil("name")) in page and html.escape(_evil("set")) in page  # escaped exactly once
    assert "&amp;lt;" not in page


@pytest.mark.parametrize("name", ["eval.json", "ablation.json", "dissociation.json", "manifold/step_10.json"])
@pytest.mark.parametrize("content", [b'{"step": 3,', b"\xff\xfe not utf-8", b"[1, 2]"])
def test_a_corrupt_json_file_is_named(tmp_path, name, content):
    write_json_atomic(tmp_path / "config.json", {"task_name": "bijection", "model_name": "transformer"})
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name))) as caught:
        build_report(tmp_path)
    assert not isinstance(caught.value, (json.JSONDecodeError, UnicodeDecodeError))


def test_eval_and_report_show_the_same_geometry_numbers(full_run):
    """One trained model: eval.json's geometry variants are those of the loaded checkpoint on the first
    evaluation batch, and the report shows the same numbers beside the paper's, row for row."""
    from windtunnel.experiments.evaluation import load_model
    from windtunnel.probes import geometry_variants
    from windtunnel.reports import geometry_variant_rows

    stored = json.loads((full_run / "eval.json").read_text())["geometry_variants"]
    experiment, model, _ = load_model(full_run)
    task = experiment.build_task()
    batch = task.sample(64, generator=torch.Generator().manual_seed(12345))  # the fixture's eval: 64 sequences, seed 12345
    assert stored["n_sequences"] == 64
    assert stored["quantities"] == json.loads(json.dumps(geometry_variants(model, task, batch)))
    quantities = stored["quantities"]
    assert set(quantities) == {"key_orthogonality", "value_manifold_pc1_share", "focusing_ratio"}
    assert all(v["value"] is not None for q in quantities.values() for v in q.values())  # a TinyGPT bijection run has them all
    rows = geometry_variant_rows(stored)
    assert len(rows) == sum(len(q) for q in quantities.values())
    page = build_report(full_run).read_text()
    for row in rows:
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in row)
        assert f"<tr>{cells}</tr>" in page, row[:2]
    ours = [r for r in rows if r[1] == "hypothesis_abs (ours)"][0]
    assert ours[3].startswith("0.052 vs 0.082 random") and ours[2] != "—"


def test_eval_command_prints_the_geometry_rows_of_its_eval_json(tmp_path, full_run):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    result = CliRunner().invoke(main, ["eval", str(run), "--n", "16"])
    assert result.exit_code == 0, result.output
    from windtunnel.reports import geometry_variant_rows

    stored = json.loads((run / "eval.json").read_text())["geometry_variants"]
    assert stored["n_sequences"] == 16
    lines = result.output.splitlines()
    for quantity, name, value, paper, _, _ in geometry_variant_rows(stored):
        if value.startswith("— ("):  # not measured: listed once under its reason
            reason = value[3:-1].rstrip(".")
            assert any(l.startswith(f"  not measured ({reason}): ") and f"{quantity}, {name}" in l for l in lines), name
            continue
        line = f"  {quantity}, {name}: {value}" + (f"  [paper: {paper}]" if paper != "—" else "")
        assert line in lines


SNAKE = re.compile(r"\b[a-z0-9]+_[a-z0-9_]+\b")  # a snake_case identifier (W_V and $o_{t-d}$ are not)


def _figure_texts(monkeypatch):
    """Patch the report's figure writer to record, per figure, the titles, axis labels, legend
    entries, tick labels and free texts of every panel as they are drawn."""
    from windtunnel.reports import html as report_html

    drawn, original = [], report_html._png

    def recording(fig):
        embedded = original(fig)  # saving the figure draws it, which resolves the tick labels
        for ax in fig.axes:
            drawn.append({
                "labels": [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), fig.get_suptitle() if hasattr(fig, "get_suptitle") else ""]
                + ([t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []),
                "ticks": [t.get_text() for t in (*ax.get_xticklabels(), *ax.get_yticklabels())],
                "notes": [t.get_text() for t in ax.texts],
            })
        return embedded

    monkeypatch.setattr(report_html, "_png", recording)
    return drawn


def test_titles_labels_and_tables_show_no_snake_case_identifiers(full_run, monkeypatch):
    drawn = _figure_texts(monkeypatch)
    page = build_report(full_run).read_text()
    labels = [text for panel in drawn for text in panel["labels"] if text]
    assert len(labels) > 30
    assert not [text for text in labels if SNAKE.search(text)]
    headings = re.findall(r"<h[12]>(.*?)</h[12]>", page) + re.findall(r"<th>(.*?)</th>", page)
    assert not [h for h in headings if SNAKE.search(h)]
    # the first column of the paper, dissociation and ablation tables: metric names in words
    first_cells = re.findall(r"<tr><td>(.*?)</td>", page)
    named = [c for c in first_cells if not re.fullmatch(r"[\d.—-]+", c)]
    assert named and not [c for c in named if SNAKE.search(html.unescape(c)) and c not in ("key orthogonality (layer 0)",)]
    assert SNAKE.search("advantage_abs_mean (head mean)") and not SNAKE.search("cos(ΔV, −AᵀU), gradient step on $W_V$")


def test_log_axes_have_plain_tick_labels(full_run, monkeypatch):
    from matplotlib.figure import Figure

    from windtunnel.reports.figures import plain_log_ticks, tick_text

    drawn = _figure_texts(monkeypatch)
    build_report(full_run)
    ticks = [t for panel in drawn for t in panel["ticks"] if t]
    assert ticks and not [t for t in ticks if "times" in t or "×" in t or "^" in t]
    # a narrow log axis: the default labels read '1.094×10⁰'; ours are plain decimals that stay distinct
    fig = Figure()
    ax = fig.subplots()
    ax.semilogy([1, 2, 3], [1.0938, 1.0946, 1.0953])
    fig.canvas.draw()
    default = [t.get_text() for t in ax.get_yticklabels(minor=True) + ax.get_yticklabels() if t.get_text()]
    assert any("times" in t for t in default)  # what the report used to show
    plain_log_ticks(ax)
    fig.canvas.draw()
    ours = [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]  # the ticks inside the view
    assert len(ours) >= 3 and all(re.fullmatch(r"1\.09\d*", t) for t in ours) and len(set(ours)) == len(ours)
    assert not [t.get_text() for t in ax.get_yticklabels() if "times" in t.get_text()]
    assert [tick_text(v) for v in (0.01, 1.0, 250.0, 1e-5, 2e6)] == ["0.01", "1", "250", "1e-5", "2e6"]


def test_a_run_shorter_than_log_every_gets_a_note_in_the_empty_loss_panel(tmp_path, monkeypatch):
    short = [*TINY, "train.steps=3", "train.log_every=50", "train.eval_every=3", "train.checkpoint_every=3"]
    Trainer(apply_overrides(get_preset("bijection", "transformer", "cpu"), short), tmp_path).fit()
    assert not [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("split") == "train" and r.get("loss_nats") is not None]
    drawn = _figure_texts(monkeypatch)
    build_report(tmp_path)
    notes = " ".join(" ".join(panel["notes"]) for panel in drawn).replace("\n", " ")
    assert "No training loss logged yet: the loss is logged every 50 steps (train.log_every) and this run has 3." in notes
    assert "No held-out evaluation yet" not in notes  # the eval at the last step is drawn, with no note


def test_the_report_cites_sources_as_paper_or_repository_file(full_run):
    page = html.unescape(build_report(full_run).read_text())
    table = page.split("Paper numbers beside ours", 1)[1].split("<h2>", 1)[0]
    assert "arXiv 2512.22471v3" in table and "github.com/vishalmisra/bayesian-wind-tunnel, REPRODUCE.md" in table
    assert "authors' README" not in table and "(recap)" not in table


def test_paper_table_reads_eval_json_without_telemetry_or_dissociation(full_run, tmp_path):
    copy = tmp_path / "eval_only"
    shutil.copytree(full_run, copy, ignore=shutil.ignore_patterns("checkpoints", "snapshots", "telemetry.jsonl", "dissociation.*"))
    ours = {q: v["value"] for q, variants in json.loads((copy / "eval.json").read_text())["geometry_variants"]["quantities"].items()
            for v in variants.values() if v.get("ours")}
    table = build_report(copy).read_text().split("Paper numbers beside ours", 1)[1].split("<h2>", 1)[0]
    for quantity in ("key_orthogonality", "value_manifold_pc1_share", "focusing_ratio"):
        assert f"{_text(ours[quantity])} (eval.json)" in table, quantity


def test_a_value_manifold_row_shows_its_position_control():
    from windtunnel.reports import geometry_variant_rows

    entry = {"value": 0.9, "spearman": 0.95, "spearman_position": -0.95, "partial_pearson_given_position": None,
             "partial_undefined": "entropy is a function of position here", "unavailable": None, "paper": None,
             "description": "d", "source": "s", "ours": True}
    geometry = {"quantities": {"value_manifold_pc1_share": {"sites_final_norm_zscored": entry},
                               "focusing_ratio": {"sites": {"value": 0.5, "unavailable": None}}}}
    manifold, focusing = geometry_variant_rows(geometry)
    assert manifold[2] == "0.9000 (Spearman of PC1 with entropy 0.9500, with position -0.9500; within positions r —)"
    assert focusing[2] == "0.5000"
