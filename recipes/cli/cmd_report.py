"""`lesion report`: an interactive HTML page for a run folder, or for every run in a folder plus an index."""

from __future__ import annotations

from pathlib import Path

from interventions.core.errors import SpecError


def add_parser(sub, parents) -> None:
    r = sub.add_parser("report", parents=parents,
                       help="write an interactive, self-contained HTML report of a run (or of a folder of runs)")
    r.add_argument("run_dir", help="a folder `lesion run` wrote, or a folder of such folders (then also index.html)")
    r.add_argument("--compare", metavar="OTHER_RUN", help="a run of the same spec to set beside it (e.g. exact "
                   "against attribution): both grids, their difference, Pearson r and the top-10 overlap")
    r.add_argument("--out", metavar="FILE", help="where the page goes (default RUN_DIR/report.html)")
    r.set_defaults(fn=main)


def main(args) -> int:
    from interventions.report import write_index, write_report
    from interventions.report.run import is_run

    folder = Path(args.run_dir)
    if is_run(folder):
        path = write_report(folder, args.out, args.compare)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; opens offline in a browser)")
        return 0
    if args.compare or args.out:
        flag = "--compare" if args.compare else "--out"
        raise SpecError(flag, getattr(args, flag[2:]), "a single run folder as RUN_DIR (this one holds no run files)")
    index, written = write_index(folder)
    print(f"wrote {len(written)} report(s) and {index}")
    return 0
