"""Publish `qft report` outputs: results JSON + plot into the repo, docs/results.md tables regenerated.

For each report folder (default ``runs/report/kodak`` and ``runs/report/tecnick``):
``bdrate.json`` → ``benchmarks/results/report_<name>.json``, ``per_image.json`` merged
into it, ``rd-psnr-rgb.png`` → ``docs/figures/report_<name>.png``; then the block of
``docs/results.md`` between ``<!-- report:<name> -->`` and ``<!-- /report:<name> -->`` is
rewritten from the committed JSON (never typed by hand). The README's headline table is
written by hand from these (≤ 6 rows, linking here).

    python benchmarks/publish_reports.py                 # copy from runs/ and regenerate
    python benchmarks/publish_reports.py --tables-only   # regenerate from the committed JSONs
"""

from __future__ import annotations

import argparse
import json
import re
import shutil

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
#: the document whose report blocks are generated
RESULTS_DOC = ROOT / "docs" / "results.md"


def _fmt(x) -> str:
    return "–" if x is None else f"{x:+.2f} %"


def _cols(cmp: dict | None) -> list[str]:
    if not cmp:
        return ["", ""]
    p = cmp["psnr-rgb"]
    if all(v is None for v in p["local"]):  # no local measure (a report without row sweeps)
        return ["–", _fmt(p["bd_pchip"])]
    per_point = " / ".join("–" if v is None else f"{v:+.1f}" for v in p["local"])
    return [f"**{_fmt(p['local_mean'])}** ({per_point})", _fmt(p["bd_pchip"])]


def table(summary: dict) -> str:
    """The docs/results.md block of one report summary."""
    lines = [
        f"{summary['images']} images of `{summary['data']}`, real bitstreams, {summary['machine']}, "
        f"{summary['date']} (`benchmarks/results/report_{summary['name']}.json`; regenerate with "
        f"`qft report recipes/report/{summary['name']}.yaml && python benchmarks/publish_reports.py`).",
        "Local: mean over the rate points (each value in brackets, λ ascending) of the rate change at equal "
        "PSNR against the anchor swept over its quantizer step; BD: Bjøntegaard pchip over the "
        "rate points on both curves' Pareto fronts. Negative = saving.",
        "",
        "| model | quantizer | vs base USQ: local | BD | vs base, same quantizer: local | BD "
        "| vs control: local | BD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['row']} | {r['quantizer']} | "
            + " | ".join(_cols(r["vs_base_usq"]) + _cols(r["vs_base_same_quantizer"]) + _cols(r.get("vs_control")))
            + " |"
        )
    versus = [r for r in summary["rows"] if r.get("vs_quantizer")]
    if versus:  # the recipe's `versus`: a quantizer against the same row under another
        lines += ["", "| model | quantizer | vs the same model under | local | BD |", "|---|---|---|---|---|"]
        for r in versus:
            anchor = r["vs_quantizer"]["anchor"].split("/", 1)[1]
            lines.append(f"| {r['row']} | {r['quantizer']} | {anchor} | " + " | ".join(_cols(r["vs_quantizer"])) + " |")
    lines += ["", f"![{summary['name']} RD](figures/report_{summary['name']}.png)"]  # relative to docs/
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="*", default=["runs/report/kodak", "runs/report/tecnick"])
    parser.add_argument("--tables-only", action="store_true", help="regenerate the tables from the committed JSONs")
    args = parser.parse_args()
    names = []
    for folder in map(Path, args.reports):
        name = folder.name
        names.append(name)
        if args.tables_only:
            continue
        summary = json.loads((folder / "bdrate.json").read_text())
        summary["name"] = name
        summary["per_image"] = json.loads((folder / "per_image.json").read_text())
        summary.pop("markdown", None)
        # paths inside the repository as the repository names them, not as this machine does
        text = json.dumps(summary, indent=1).replace(json.dumps(f"{ROOT}/")[:-1], '"')
        (RESULTS / f"report_{name}.json").write_text(text + "\n")
        shutil.copy(folder / "rd-psnr-rgb.png", FIGURES / f"report_{name}.png")
    readme = RESULTS_DOC.read_text()
    for name in names:
        path = RESULTS / f"report_{name}.json"
        if not path.is_file():
            continue
        block = table(json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- report:{name} -->\n)(?:.*?\n)?(<!-- /report:{name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"{RESULTS_DOC} has no <!-- report:{name} --> block")
        readme = pattern.sub(lambda m, block=block: m.group(1) + block + "\n" + m.group(2), readme)
    RESULTS_DOC.write_text(readme)
    print(f"{RESULTS_DOC.relative_to(ROOT)} updated:", ", ".join(names))


if __name__ == "__main__":
    main()
