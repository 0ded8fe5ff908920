"""The full-decompose study's files: ``full_decompose.json`` (meta + rows), ``full_decompose.md``
(a caption naming the model, the windows, the calibration file and split and the scored files,
then the table) and ``full_decompose.png`` (Fig. 2-style plot).

The json and md are rewritten after every finished row (atomically: a temporary file, then a
rename), so an interrupted study keeps what it finished. A later run of the same settings
(``SETTINGS``: model, windows, corpora, solver, dtype, and the calibration's source, size, seed,
length, format, sampling) into the same folder keeps those rows and scores only the missing
(method, r) pairs; other settings, or result files it cannot read, are refused unless ``force``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loralab.config import ConfigError
from loralab.decomposition.calibration import CORPORA

FILES = ("full_decompose.json", "full_decompose.md", "full_decompose.png")
SETTINGS = ("model_id", "seq_len", "max_windows", "corpora", "solver", "dtype")
CALIBRATION_SETTINGS = ("source", "num_samples", "seed", "seqlen", "fmt", "sampling")
METHOD_ORDER = ("base", "cov-aware", "act-aware", "plain")


def settings(meta: dict) -> dict:
    """What decides a row's numbers (the rows of two runs with equal settings are interchangeable)."""
    cal = meta.get("calibration") or {}
    return {**{k: meta.get(k) for k in SETTINGS}, "calibration": {k: cal.get(k) for k in CALIBRATION_SETTINGS}}


def finished_rows(out_dir, meta: dict, force: bool = False) -> list[dict]:
    """The rows a previous run of the same settings left in ``out_dir`` ([] for none, or with
    ``force``). Raises ``ConfigError`` (exit 2) when the folder holds result files of other
    settings, or ones it cannot read, and ``force`` is not set: they would be overwritten."""
    out = Path(out_dir)
    present = [name for name in FILES if (out / name).exists()]
    if force or not present:
        return []
    try:
        old = json.loads((out / FILES[0]).read_text())
        old_settings, rows = settings(old["meta"]), list(old["rows"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = f"{FILES[0]} cannot be read ({type(exc).__name__}: {exc})"
    else:
        new_settings = settings(meta)
        if old_settings == new_settings:
            return rows
        diff = [f"{k}: {old_settings[k]!r} there, {new_settings[k]!r} now" for k in new_settings
                if old_settings[k] != new_settings[k]]
        reason = "they hold a study of other settings (" + "; ".join(diff) + ")"
    raise ConfigError([f"'--out' {str(out)!r} holds result files ({', '.join(present)}) this study would overwrite: "
                       f"{reason}. Pass another --out, or --force to overwrite them"], "loralab decompose")


def sort_rows(rows: list[dict]) -> list[dict]:
    """Base first, then each method's rows by r (methods in the paper's order)."""
    def key(row):
        m = row["method"]
        return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m, row["r"])

    return sorted(rows, key=key)


def prompted(calibration: dict) -> bool:
    """Whether the calibration samples were instruction rows put in its prompt format (``fmt``); a corpus
    (wikitext2, ptb, c4, nqopen, triviaqa: joined text) has none. Its provenance's ``kind``, or for a
    provenance written before ``kind`` was recorded, its name."""
    if calibration.get("kind"):
        return calibration["kind"] == "instructions"
    return calibration.get("name") not in CORPORA


def row_line(row: dict, corpora: list[str]) -> str:
    """A finished row as one line for the log: ``plain r=4: wikitext2 perplexity 1,234.568, ptb perplexity ...``;
    a perplexity that overflowed (recorded as the float maximum by the degenerate rule, ``tasks.metrics.settle``)
    reads "overflowed"."""
    label = "base model" if row["method"] == "base" else f"{row['method']} r={row['r']}"
    degenerate = row.get("degenerate") or []
    return f"{label}: " + ", ".join(f"{c} perplexity " + ("overflowed" if c in degenerate else f"{row[c]:,.3f}")
                                    for c in corpora)


def caption(meta: dict) -> str:
    """What the table measured, above it in the md file: model, windows, scored files, calibration."""
    cal = meta.get("calibration") or {}
    windows = f"first {meta['max_windows']} " if meta.get("max_windows") else "all "
    scored = ", ".join(f"{c} `{(meta.get('scored_files') or {}).get(c) or 'hub test split'}`" for c in meta["corpora"])
    split = f", {cal['split']} split" if cal.get("split") else ""
    fmt = f"{cal.get('fmt')} prompts" if prompted(cal) else "plain text"
    lines = [
        f"Full-decompose study: `{meta['model_id']}` ({meta.get('dtype')}), perplexity over the {windows}non-overlapping "
        f"{meta['seq_len']}-token windows of {scored}.",
        f"Calibration: {cal.get('name')}, {cal.get('num_samples')} samples of at most {cal.get('seqlen')} tokens "
        f"({fmt}, {cal.get('sampling')}, seed {cal.get('seed')}) from `{cal.get('source')}`{split}"
        + (f" ({cal['note']})" if cal.get("note") else "") + ".",
    ]
    if meta.get("overlap"):
        lines.append(f"**Calibrated on the evaluation data: {meta['overlap_note']}.**")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict], corpora: list[str]) -> str:
    head = "| method | r | " + " | ".join(f"{c} ppl" for c in corpora) + " |\n|---|---|" + "---|" * len(corpora) + "\n"
    body = "".join(
        f"| {row['method']} | {row['r']} | " + " | ".join(f"{row[c]:.3f}" for c in corpora) + " |\n" for row in rows
    )
    return head + body


def plot(rows: list[dict], corpora: list[str], path: Path) -> Path | None:
    """Fig. 2-style plot (perplexity against r, one line per method); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4))
    axes = [axes] if len(corpora) == 1 else axes
    for ax, corpus in zip(axes, corpora):
        for method in dict.fromkeys(row["method"] for row in rows if row["method"] != "base"):
            pts = sorted((row["r"], row[corpus]) for row in rows if row["method"] in (method, "base"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("r (smallest components discarded per layer)")
        ax.set_ylabel(f"{corpus} perplexity")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a signal mid-write leaves the previous file whole


def write_report(rows: list[dict], corpora: list[str], out_dir, meta: dict, with_plot: bool = True) -> dict:
    """results JSON + captioned markdown table (+ PNG plot if ``with_plot`` and matplotlib) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sort_rows(rows)
    _write(out / FILES[0], json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    _write(out / FILES[1], caption(meta) + "\n" + markdown_table(rows, corpora))
    png = plot(rows, corpora, out / FILES[2]) if with_plot else None
    return {"json": str(out / FILES[0]), "md": str(out / FILES[1]), "png": str(png) if png else None}
