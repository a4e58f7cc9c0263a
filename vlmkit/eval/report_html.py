"""A self-contained HTML page for a reliability report: tables, and matplotlib plots embedded as base64
PNG. Nothing is loaded from elsewhere (no scripts, stylesheets, fonts or images by URL).

Plots need matplotlib (``pip install vlmkit[report]``); without it the page has the tables only and
says so.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

TITLES = {
    "pope": "POPE: object existence",
    "chair": "CHAIR: hallucinated objects in captions",
    "blind": "Blind: answers without the image",
    "swap": "Swap: answers on a different image",
    "stress": "Stress: corruptions and scene shifts",
    "attention": "Attention",
    "modality_gap": "Modality gap (clip-stage tower)",
}
EXPLAIN = {
    "pope": "Yes/no questions about objects that are present (answer yes) or absent (answer no), absent ones "
            "sampled at random, among the most frequent objects (popular) or among those that co-occur most "
            "with the present ones (adversarial). 'unparsed' answers are neither yes nor no and count as wrong.",
    "chair": "CHAIR-i: hallucinated object mentions / all object mentions. CHAIR-s: captions with at least one "
             "hallucinated object / all captions. Recall: true objects the captions mention.",
    "blind": "The same questions with the real image, a blank grey image and the dataset-mean image. A model that "
             "looks at the image falls to chance without it.",
    "swap": "Each question asked again on another image whose true answer differs. Grounding rate: the answer "
            "matches the new image's truth; changed rate: the answer differs from the original one.",
    "attention": "Attention of each generated answer token on the image tokens (per LM layer, mean over heads) and "
                 "its entropy, for blind-probe questions the model answered correctly vs incorrectly; uniform: the "
                 "share that attention spread evenly over the prompt would give.",
    "modality_gap": "Distance between the centroids of the normalised image and text embeddings of the clip-stage "
                    "tower the model's vision encoder came from (0: one shared region), with the mean cosine of "
                    "matched and unmatched image-caption pairs.",
}
STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 3px; margin-top: 1.8em; }
p.note { color: #555; max-width: 60em; }
.na { color: #a33; }
img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header or ())
    body = "".join("<tr>" + "".join(f"<td>{_num(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{f'<thead><tr>{head}</tr></thead>' if head else ''}<tbody>{body}</tbody></table>"


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) rows of a report's headline numbers, for the markdown summary and the page."""
    rows: list[tuple[str, str]] = []
    for name, m in ((report.get("pope") or {}).get("splits") or {}).items():
        rows.append((f"POPE {name}: F1 / accuracy / yes-ratio / unparsed",
                     f"{_num(m['f1'])} / {_num(m['accuracy'])} / {_num(m['yes_ratio'])} / {m['unparsed']}"))
    c = report.get("chair") or {}
    if "chair_i" in c:
        rows.append(("CHAIR-i / CHAIR-s / object recall",
                     f"{_num(c['chair_i'])} / {_num(c['chair_s'])} / {_num(c['recall'])}"))
    b = (report.get("blind") or {}).get("overall")
    if b:
        rows.append(("Accuracy with image / blank / mean image / chance",
                     f"{_num(b['image'])} / {_num(b['blank'])} / {_num(b['mean'])} / {_num(b['chance'])}"))
    s = report.get("swap") or {}
    if "grounding_rate" in s:
        rows.append(("Swap grounding / changed / coverage",
                     f"{_num(s['grounding_rate'])} / {_num(s['changed_rate'])} / {_num(s['coverage'])}"))
    stress = report.get("stress") or {}
    for group in ("corruptions", "scene_shifts"):
        for name, curve in (stress.get(group) or {}).items():
            horizon = curve.get("horizon")
            rows.append((f"Stress horizon: {name}", "none" if horizon is None else str(horizon)))
    for section in ("stress", "attention", "modality_gap"):
        if (report.get(section) or {}).get("status"):
            rows.append((section, report[section]["status"]))
    return rows


def png_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


# --------------------------------------------------------------------------------------------------
# Plots


def _figure_png(draw: Callable[[Any], None], size: tuple[float, float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size, dpi=100)
    try:
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _grouped_bars(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float]], title: str) -> None:
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(groups))], values, width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot_pope(section: Mapping[str, Any]) -> bytes:
    splits = section["splits"]
    metrics = ("accuracy", "precision", "recall", "f1", "yes_ratio")

    def draw(fig: Any) -> None:
        _grouped_bars(fig.add_subplot(), list(splits), {m: [splits[s][m] for s in splits] for m in metrics},
                      "POPE by negative sampling")
    return _figure_png(draw, (7, 3.2))


def plot_chair(section: Mapping[str, Any]) -> bytes:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 2, 1)
        names = ("chair_i", "chair_s", "recall")
        ax.bar(names, [section[n] for n in names], color=["#c44", "#e88", "#4a4"])
        ax.set_ylim(0, 1.05)
        ax.set_title("CHAIR")
        ax = fig.add_subplot(1, 2, 2)
        top = section.get("top_hallucinated") or []
        ax.barh([str(n) for n, _ in top][::-1], [c for _, c in top][::-1], color="#c44")
        ax.set_title("most hallucinated objects")
    return _figure_png(draw, (9, 3.2))


def plot_blind(section: Mapping[str, Any]) -> bytes:
    by_type = section["by_type"]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        types = list(by_type)
        _grouped_bars(ax, types, {c: [by_type[t][c] for t in types] for c in ("image", "blank", "mean")},
                      "accuracy by question type")
        ax.scatter([i + 0.8 / 3 for i in range(len(types))], [by_type[t]["chance"] for t in types],
                   marker="_", s=900, color="black", zorder=3, label="chance")
        ax.legend(fontsize=8)
    return _figure_png(draw, (8, 3.2))


def plot_swap(section: Mapping[str, Any]) -> bytes:
    by_type = {t: v for t, v in section["by_type"].items() if v["n"]}

    def draw(fig: Any) -> None:
        _grouped_bars(fig.add_subplot(), list(by_type),
                      {m: [by_type[t][m] for t in by_type] for m in ("grounding_rate", "changed_rate", "coverage")},
                      "swap by question type")
    return _figure_png(draw, (8, 3.2))


# --------------------------------------------------------------------------------------------------
# Sections


def _pope_html(s: Mapping[str, Any]) -> str:
    cols = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unparsed", "unparsed_rate")
    rows = [[name, *(m[c] for c in cols)] for name, m in s["splits"].items()]
    return (f"<p>{s['n_images']} images, question <code>{html.escape(s['question'])}</code></p>"
            + table(["sampling", *cols], rows))


def _chair_html(s: Mapping[str, Any]) -> str:
    out = table(["CHAIR-i", "CHAIR-s", "recall", "captions", "mentions", "hallucinated", "no mention"],
                [[s["chair_i"], s["chair_s"], s["recall"], s["n_captions"], s["mentions"], s["hallucinated"],
                  s["no_mention"]]])
    out += f"<p>prompt: <code>{html.escape(s['prompt'])}</code></p>"
    bad = [d for d in s["details"] if d["hallucinated"]]
    examples = bad[:6] + [d for d in s["details"] if not d["hallucinated"]][:3]
    out += table(["caption", "hallucinated"], [[d["caption"], ", ".join(d["hallucinated"]) or "none"]
                                               for d in examples])
    return out


def _blind_html(s: Mapping[str, Any]) -> str:
    cols = ("n", "image", "blank", "mean", "chance", "majority", "uniform")
    rows = [[t, *(v[c] for c in cols)] for t, v in s["by_type"].items()]
    rows.append(["all", *(s["overall"][c] for c in cols)])
    return table(["type", *cols], rows)


def _swap_html(s: Mapping[str, Any]) -> str:
    cols = ("n", "coverage", "grounding_rate", "changed_rate", "grounding_rate_when_correct")
    rows = [[t, *(v[c] for c in cols)] for t, v in s["by_type"].items()]
    rows.append(["all", s["n"], s["coverage"], s["grounding_rate"], s["changed_rate"],
                 s["grounding_rate_when_correct"]])
    examples = table(["question", "truth", "answer", "swapped truth", "swapped answer"],
                     [[e["question"], e["answer"], e["prediction"], e["swap_answer"], e["swap_prediction"]]
                      for e in s.get("examples", [])[:6]])
    return table(["type", *cols], rows) + examples


def _series(values: Sequence[Any] | None) -> str:
    return "\u00a0".join(_num(v) for v in values or [])  # a non-breaking space: one line per cell


def _stress_html(s: Mapping[str, Any]) -> str:
    out = (f"<p class='note'>Horizon: the first severity whose hallucination rate (\"yes\" to questions about "
           f"absent objects) exceeds {_num(s.get('threshold'))}; none: never. {_num(s.get('n_images'))} images "
           "per condition. Values are listed by severity.</p>")
    for group in ("corruptions", "scene_shifts"):
        curves = s.get(group) or {}
        if not curves:
            continue
        rows = [[name, "none" if c.get("horizon") is None else c["horizon"], _series(c.get("severity")),
                 _series(c.get("accuracy")), _series(c.get("hallucination_rate")), _series(c.get("chair_i"))]
                for name, c in curves.items()]
        out += f"<h3>{html.escape(group.replace('_', ' '))}</h3>" + table(
            ["name", "horizon", "severity", "accuracy", "hallucination rate", "CHAIR-i"], rows)
    return out


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, (list, tuple)):
        if len(value) <= 12 and all(isinstance(v, (int, float, str)) or v is None for v in value):
            return [(prefix, ", ".join(_num(v) for v in value))]
        return [(prefix, f"({len(value)} items)")]
    return [(prefix, value)]


def _generic_html(s: Mapping[str, Any]) -> str:
    return table(["key", "value"], _flatten(s))


RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "pope": _pope_html, "chair": _chair_html, "blind": _blind_html, "swap": _swap_html, "stress": _stress_html,
}
PLOTTERS: dict[str, Callable[[Mapping[str, Any]], bytes]] = {
    "pope": plot_pope, "chair": plot_chair, "blind": plot_blind, "swap": plot_swap,
}


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_report_html(report: Mapping[str, Any], plots: Mapping[str, bytes] | None = None) -> str:
    """The report as one HTML page. ``plots`` adds PNGs for sections drawn elsewhere (stress, attention)."""
    plots = dict(plots or {})
    can_plot = _have_matplotlib()
    meta = report.get("meta", {})
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vlmkit reliability report</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>Reliability report</h1>",
             table(None, [[k, v] for k, v in _flatten({k: meta[k] for k in meta if k != "sizes"})]),
             "<h2 id='summary'>Summary</h2>", table(["metric", "value"], summary_rows(report))]
    if not can_plot:
        parts.append("<p class='na'>matplotlib is not installed: plots are left out (pip install vlmkit[report]).</p>")
    for name, title in TITLES.items():
        section = report.get(name)
        if section is None:
            continue
        parts.append(f"<h2 id='{name}'>{html.escape(title)}</h2>")
        if name in EXPLAIN:
            parts.append(f"<p class='note'>{html.escape(EXPLAIN[name])}</p>")
        if section.get("status"):
            why = html.escape(section.get("reason", ""))
            parts.append(f"<p class='na'>{html.escape(section['status'])}: {why}</p>")
            continue
        parts.append(RENDERERS.get(name, _generic_html)(section))
        png = plots.get(name)
        if png is None and can_plot and name in PLOTTERS:
            png = PLOTTERS[name](section)
        if png:
            parts.append(png_tag(png, title))
    parts.append("</body></html>")
    return "\n".join(parts)
