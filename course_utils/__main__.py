"""Command line: ``python -m course_utils doctor | prepare | run | grade``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, devices, profile and model availability")
    sub.add_parser("prepare", help="make the profile's models ready (converts the bundled GGUF once)")
    run = sub.add_parser("run", help="execute notebooks headless")
    run.add_argument("notebooks", nargs="+")
    run.add_argument("--out", default="build", help="folder for executed copies and HTML")
    run.add_argument("--inplace", action="store_true", help="overwrite the notebooks' stored outputs")
    run.add_argument("--jobs", type=int, default=1, help="notebooks run at once (each its share of the CPUs)")
    from .grading import add_arguments

    add_arguments(sub.add_parser("grade", help="run homework notebooks in the sandbox and print a "
                                               "score table"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if args.command == "doctor":
        from .models import doctor

        print(doctor().to_string())
    elif args.command == "prepare":
        from .models import default_name, embedding_path, resolve

        resolve(), embedding_path()
        print(f"ready: chat model {default_name('chat')}, embeddings {default_name('embedding')}")
    elif args.command == "run":
        from .notebooks import run_notebooks

        table = run_notebooks(args.notebooks, out_dir=args.out, inplace=args.inplace, jobs=args.jobs)
        print(table.drop(columns="error").to_string(index=False))
        failed = table[table.status != "ok"]
        for row in failed.itertuples():
            print(f"FAILED {row.notebook}: {row.error}", file=sys.stderr)
        return 1 if len(failed) else 0
    elif args.command == "grade":
        from .grading import run as grade

        return grade(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
