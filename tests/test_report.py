"""The HTML report: self-contained, every plot present, renders in a real headless browser;
TensorBoard event files through accelerate's trackers."""

import os
import re
import shutil
import subprocess

import pytest

from budgetune.report import PLOTS
from budgetune.train import train

from helpers import tiny_config, write_text_corpus


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    corpus = write_text_corpus(tmp / "corpus")
    for name, lr in (("a", 3e-3), ("b", 1e-2)):
        train(tiny_config(tmp / name, corpus, budget={"steps": 12}, optim={"lr": lr}, eval={"every": 0.25}), quiet=True)
    return tmp


def test_train_writes_a_self_contained_report(runs):
    page = (runs / "a" / "run" / "report.html").read_text()
    for pid, *_ in PLOTS:
        assert re.search(rf"<figure class='plot' id='{pid}'>.*?<svg", page, re.S), pid
    # offline: nothing to fetch (namespace URIs of inline SVG are names, not requests)
    assert "src=" not in page and "<script" not in page and "<link" not in page and 'href="http' not in page
    assert "Budget: given / used" in page and "Planner: predicted / measured" in page and "Environment" in page
    assert "budget:" in page  # the config is embedded


def test_comparison_of_several_runs_tells_them_apart(runs, tmp_path):
    from budgetune.cli import main

    out = tmp_path / "compare.html"
    assert main(["report", str(runs / "a" / "run"), str(runs / "b" / "run"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "2 runs compared" in page and "a/run" in page and "b/run" in page


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    from budgetune.cli import main

    assert main(["report", str(tmp_path)]) == 2


def test_renders_in_a_headless_browser(runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("BUDGETUNE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    page = runs / "a" / "run" / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for pid, *_ in PLOTS:  # the parsed document holds each figure with its SVG plot (axes, lines)
        figure = re.search(rf'<figure class="plot" id="{pid}">(.*?)</figure>', dom.stdout, re.S)
        assert figure and "<svg" in figure.group(1) and "<path" in figure.group(1), pid
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    image = Image.open(shot).convert("L")
    colors = image.getcolors(maxcolors=1 << 16) or []
    assert image.size == (1200, 2400) and len(colors) > 50  # not a blank page: text, lines and markers drawn


def test_tensorboard_tracker_writes_readable_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    corpus = write_text_corpus(tmp_path / "corpus", n_files=4)
    cfg = tiny_config(tmp_path, corpus, budget={"steps": 6}, eval={"every": 0.5})
    cfg["tracking"] = ["tensorboard"]
    train(cfg, quiet=True)
    files = list((tmp_path / "run" / "tracking").rglob("events.out.tfevents.*"))
    assert files
    scalars = set()
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/loss"} <= scalars


def test_unknown_or_missing_tracker_is_a_config_error(tmp_path):
    from budgetune.errors import ConfigError

    corpus = write_text_corpus(tmp_path / "corpus", n_files=2)
    cfg = tiny_config(tmp_path, corpus)
    cfg["tracking"] = ["tensorbored"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()
