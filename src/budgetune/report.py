"""`budgetune report RUN [RUN ...]`: one self-contained HTML page per run, or comparing runs.

Plots are matplotlib SVG written inline (no scripts, no network: the file opens offline and
prints); tables are plain HTML. What it shows, per run or overlaid across runs:
loss (train and eval) against tokens and against wall-clock, the LR against budget
progress, tokens/s and memory over time, the budget given against what was used, the
planner's predictions against the measurements, notable events (skipped steps, OOM
recoveries, Fast Forward), the config and the environment.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
from pathlib import Path

from .errors import BudgetuneError
from .metrics import read_metrics
from .rundir import RunDir
from .units import format_bytes, format_count, format_duration

PLOTS = [  # id, title, x key, y key(s), x label, y label
    ("loss-tokens", "Loss against tokens", "tokens", ("loss", "eval_loss"), "training tokens", "loss (nats/token)"),
    ("loss-time", "Loss against wall-clock", "seconds", ("loss", "eval_loss"), "seconds of budget", "loss (nats/token)"),
    ("lr-progress", "Learning rate against budget progress", "progress", ("lr",), "budget progress", "learning rate"),
    ("throughput", "Throughput", "seconds", ("tokens_per_s",), "seconds of budget", "tokens / s (per step)"),
    ("memory", "Peak memory", "seconds", ("memory_mb",), "seconds of budget", "MiB (peak so far)"),
]
# preference runs (objective dpo / orpo / simpo) add: "eval:KEY" plots KEY of the held-out evals
PREFERENCE_PLOT = ("reward-accuracy", "Reward accuracy (share of pairs whose chosen answer gets the higher reward)", "tokens",
                   ("reward_accuracy", "eval:reward_accuracy"), "training tokens", "reward accuracy")


def _load(run_dir: Path) -> dict:
    run = RunDir(Path(run_dir))
    if not run.metrics.exists() and not run.summary.exists():
        raise BudgetuneError(f"{run.path}: not a budgetune run folder (no metrics.jsonl or summary.json); "
                             "pass the output.dir of a run")
    summary = json.loads(run.summary.read_text()) if run.summary.exists() else {}
    race = run.path / "tune.json"  # a run that `budgetune tune` chose: the race that chose it (tune.py)
    return {"name": run.path.name, "path": run.path, "summary": summary, "metrics": read_metrics(run.metrics),
            "config": run.config.read_text() if run.config.exists() else "",
            "race": json.loads(race.read_text()) if race.exists() else None}


def _labels(paths: list[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (`a/run`, `b/run`)."""
    parts = [p.resolve().parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # matplotlib's RDF block: not needed inline
    return text[text.index("<svg"):]  # drop the XML prologue and doctype: inline SVG


def _plot(runs: list[dict], x: str, ys: tuple[str, ...], xlabel: str, ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    drawn = False
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        steps = [m for m in r["metrics"] if "event" not in m]
        evals = [m for m in r["metrics"] if m.get("event") == "eval"]
        for y in ys:
            held_out = y == "eval_loss" or y.startswith("eval:")
            source, y = (evals if held_out else steps), y.removeprefix("eval:")
            points = [(m[x], m[y]) for m in source if m.get(x) is not None and m.get(y) is not None]
            if not points:
                continue
            xs, vs = zip(*points)
            label = r["name"] if len(runs) > 1 else ""
            if held_out:
                ax.plot(xs, vs, "o-", color=color, markersize=4, label=f"{label} eval".strip())
            else:
                ax.plot(xs, vs, "-", color=color, linewidth=1, alpha=0.8 if len(ys) > 1 else 1.0,
                        label=(f"{label} train".strip() if len(ys) > 1 else label) or None)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no data recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v, kind: str = "") -> str:
    if v is None:
        return "—"
    if kind == "s":
        return format_duration(v)
    if kind == "count":
        return format_count(v)
    if kind == "mb":
        return format_bytes(v * 2**20)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _budget_rows(runs: list[dict]) -> list[list]:
    rows = []
    for r in runs:
        s = r["summary"]
        given = s.get("budget", {})
        rows.append([r["name"], s.get("governing_budget", "—"),
                     f"{_fmt(given.get('time_s'), 's')} / {_fmt(s.get('elapsed_s'), 's')}",
                     f"{_fmt(given.get('tokens'), 'count')} / {_fmt(s.get('tokens'), 'count')}",
                     f"{_fmt(given.get('steps'))} / {_fmt(s.get('steps'))}",
                     f"{_fmt(given.get('flops'), 'count')} / {_fmt(s.get('flops'), 'count')}",
                     _fmt(s.get("overshoot_s")),
                     f"{100 * s['budget_utilisation']:.0f}%" if s.get("budget_utilisation") is not None else "—"])
    return rows


def _prediction_rows(runs: list[dict]) -> list[list]:
    rows = []
    for r in runs:
        s, p = r["summary"], r["summary"].get("predicted") or {}
        mem_p, mem_m = p.get("peak_memory_mb"), s.get("peak_memory_mb")
        tps_p, tps_m = p.get("tokens_per_s"), s.get("train_tokens_per_s_median")
        rows.append([r["name"], _fmt(mem_p, "mb"), _fmt(mem_m, "mb"),
                     f"{100 * (mem_m - mem_p) / mem_p:+.1f}%" if mem_p and mem_m else "—",
                     _fmt(tps_p, "count"), _fmt(tps_m, "count"), f"{100 * (tps_m - tps_p) / tps_p:+.1f}%" if tps_p and tps_m else "—"])
    return rows


def _result_rows(runs: list[dict]) -> list[list]:
    rows = []
    for r in runs:
        s = r["summary"]
        events = {}
        for m in r["metrics"]:
            if m.get("event") in ("bad_step", "out_of_memory", "fast_forward"):
                events[m["event"]] = events.get(m["event"], 0) + 1
        rows.append([r["name"], s.get("method", "—"), _fmt(s.get("parameters"), "count"), _fmt(s.get("trainable_parameters"), "count"),
                     f"{_fmt(s.get('eval_loss_before'))} → {_fmt(s.get('eval_loss_after'))}", _fmt(s.get("steps")),
                     _fmt(s.get("tokens_per_s"), "count"), ", ".join(f"{k} ×{v}" for k, v in sorted(events.items())) or "—",
                     "finished" if s else "unfinished (no summary.json yet)"])
    return rows


def _data_rows(runs: list[dict]) -> list[list]:
    """Per-source tokens (mixtures), and what dedup and selection did."""
    rows = []
    for r in runs:
        d = r["summary"].get("data") or {}
        for name, v in (d.get("sources") or {}).items():
            rows.append([r["name"], f"source {name}", f"{_fmt(v.get('tokens'), 'count')} tokens, {100 * v.get('share', 0):.0f}%, "
                                                      f"{v.get('epochs', 0):.2f} epochs, {v.get('examples')} examples"])
        if d.get("dedup"):
            x = d["dedup"]
            rows.append([r["name"], f"dedup {x['mode']}", f"{x['dropped_exact']} exact and {x['dropped_near']} near duplicates dropped"])
        if d.get("selection"):
            x = d["selection"]
            rows.append([r["name"], f"select {x['method']}", f"kept {x['examples_kept']} of {x['examples_before']} examples "
                                                            f"({100 * x['fraction']:.0f}% of the tokens), scoring {x['scoring_s']:.1f} s"])
    return rows


def _race_section(run: dict) -> str:
    """The budget race (tune.py): every trial's held-out loss at each rung, which went on, the winner and why,
    and a plot of loss against the budget each trial spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    race = run["race"]
    seconds = race["unit"] == "seconds"
    n_rungs = max(len(t["rungs"]) for t in race["trials"])
    rows = []
    for t in race["trials"]:
        recipe = t["method"] + (f" r{t['rank']}" if t.get("rank") else "") + ("" if t["optimizer"] == "adamw" else f" {t['optimizer']}")
        losses = [f"{x['loss']:.4f}" for x in t["rungs"]] + ["—"] * (n_rungs - len(t["rungs"]))
        state = "winner (kept)" if t["id"] == race["winner"] else f"stopped at rung {len(t['rungs'])}"
        rows.append([t["id"] + 1, recipe, f"{t['lr']:.3g}", format_duration(t["wall_s"]), format_count(t["tokens"]), *losses, state])
    spent = race.get("race_s") if seconds else race.get("race_tokens")
    share = f"{100 * spent / race['budget']['total']:.1f}%" if spent is not None else "—"
    winner = race["trials"][race["winner"]]
    text = (f"<p>{len(race['trials'])} candidates (the space had {race['space_size']}; the race budget afforded "
            f"{race['affordable']}{'; ' + ', '.join(race['shrunk']) if race['shrunk'] else ''}), successive halving with "
            f"η = {race['eta']}, loss read {'on a WSD cooldown branch' if race['mode'] == 'branch' else 'after each trial’s own cooldown'}. "
            f"<b>Chosen: {html.escape(winner['label'])}</b> — {html.escape(race['why'])}. The race cost {share} of the budget "
            f"and trained {format_count(race.get('race_tokens', 0))} tokens.</p>")
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    for i, t in enumerate(race["trials"]):
        xs = [x["wall_s"] if seconds else x["tokens"] for x in t["rungs"]]
        ax.plot(xs, [x["loss"] for x in t["rungs"]], "o-", color=f"C{i % 10}", markersize=4,
                linewidth=2.5 if t["id"] == race["winner"] else 1, label=f"{t['id'] + 1} {t['label']}")
    ax.set_xlabel("seconds of budget spent by the trial" if seconds else "tokens trained by the trial")
    ax.set_ylabel("held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    plot = _svg(fig)
    plt.close(fig)
    return (f"<h2>The race ({html.escape(run['name'])})</h2>" + text
            + _table(["trial", "recipe", "LR", "spent", "tokens", *[f"loss rung {i + 1}" for i in range(n_rungs)], ""], rows)
            + f"<figure class='plot' id='race'><figcaption>Held-out loss against budget spent, one line per trial</figcaption>{plot}</figure>")


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } th, td { padding: .25em .7em; border-bottom: 1px solid #eee; text-align: left; }
th { background: #f6f6f6; } .plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1em; }
figure { margin: 0; } figure svg { width: 100%; height: auto; } figcaption { font-weight: 600; margin-bottom: .3em; }
pre { background: #f6f6f6; padding: .7em; overflow-x: auto; font-size: 12px; } .muted { color: #777; }
"""


def render(runs: list[dict]) -> str:
    names = ", ".join(r["name"] for r in runs)
    title = f"budgetune report: {names}" if len(runs) == 1 else f"budgetune: {len(runs)} runs compared"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p class='muted'>" + " · ".join(html.escape(str(r["path"])) for r in runs) + "</p>"]
    parts.append("<h2>Results</h2>" + _table(
        ["run", "method", "parameters", "trainable", "held-out loss", "steps", "tokens/s", "events", "state"], _result_rows(runs)))
    parts.append("<h2>Budget: given / used</h2>" + _table(
        ["run", "governing", "time", "tokens", "steps", "FLOPs", "overshoot (s)", "time in optimizer steps"], _budget_rows(runs)))
    parts.append("<h2>Planner: predicted / measured</h2>" + _table(
        ["run", "peak memory predicted", "measured", "error", "tokens/s predicted", "measured (median step)", "error"],
        _prediction_rows(runs)))
    preference = [r for r in runs if r["summary"].get("preference_eval")]
    if preference:
        parts.append("<h2>Preference: held-out pairs at the end</h2>" + _table(
            ["run", "objective", "reward accuracy", "mean margin", "chosen log-prob", "rejected log-prob"],
            [[r["name"], r["summary"].get("objective", "—"), *[_fmt(r["summary"]["preference_eval"].get(k)) for k in
                                                               ("reward_accuracy", "margin", "chosen_logp", "rejected_logp")]]
             for r in preference]))
    for r in runs:
        if r.get("race") and r["race"].get("winner") is not None:
            parts.append(_race_section(r))
    data_rows = _data_rows(runs)
    if data_rows:
        parts.append("<h2>Data</h2>" + _table(["run", "what", ""], data_rows))
    parts.append("<h2>Curves</h2><div class='plots'>")
    for pid, caption, x, ys, xlabel, ylabel in PLOTS + ([PREFERENCE_PLOT] if preference else []):
        parts.append(f"<figure class='plot' id='{pid}'><figcaption>{html.escape(caption)}</figcaption>"
                     f"{_plot(runs, x, ys, xlabel, ylabel)}</figure>")
    parts.append("</div>")
    env_keys = sorted({k for r in runs for k in r["summary"].get("environment", {})})
    if env_keys:
        parts.append("<h2>Environment</h2>" + _table(
            ["", *[r["name"] for r in runs]], [[k, *[r["summary"].get("environment", {}).get(k, "—") for r in runs]] for k in env_keys]))
    parts.append("<h2>Config</h2>")
    for r in runs:
        parts.append(f"<details{' open' if len(runs) == 1 else ''}><summary>{html.escape(r['name'])}</summary>"
                     f"<pre>{html.escape(r['config'] or '(no config.yaml)')}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the HTML report of one run (default RUN/report.html) or several (default ./report.html)."""
    if not run_dirs:
        raise BudgetuneError("report: name at least one run folder")
    runs = [_load(Path(d)) for d in run_dirs]
    for run, label in zip(runs, _labels([r["path"] for r in runs])):
        run["name"] = label
    target = Path(out) if out else (runs[0]["path"] / "report.html" if len(runs) == 1 else Path("report.html"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render(runs), encoding="utf-8")
    os.replace(tmp, target)
    return target
