"""`mlops plan STAGE` with the stage's Pulumi program replaced by an empty one: the floor of figure 2.

Usage: python -m benchmarks.empty_plan [--import-program] plan STAGE

The command function, spec loading and validation, the mock runtime and the output are the real ones.
Plain, nothing of the stack is imported: what is missing is exactly what the stack adds. With
`--import-program` the real `mlops` CLI runs, having imported every command and the program with its
components and the Docker provider SDK, but declares nothing; it splits the stack's overhead into
importing its code and declaring its resources.
"""
from __future__ import annotations

import sys
import types

import pulumi
import typer

IMPORT_PROGRAM = "--import-program"


def declare_nothing(stack: str, spec: object) -> pulumi.Resource:
    """A program without resources; `mlops.plan.render` waits on the returned resource's URN."""
    root = pulumi.runtime.get_root_resource()
    assert root is not None, "a Pulumi program runs under its stack's root resource"
    return root


def run_without_program() -> None:
    # `render` imports `mlops.program` when it runs; this stand-in keeps the real one, and everything it
    # imports, out of the process.
    empty_program = types.ModuleType("mlops.program")
    setattr(empty_program, "declare_stack", declare_nothing)
    sys.modules["mlops.program"] = empty_program
    from mlops.commands import specs

    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.callback()(lambda: None)  # a group, so the command line reads `plan STAGE` as it does for `mlops`
    app.command()(specs.plan)
    app()


def run_with_program_imported() -> None:
    import mlops.cli
    import mlops.program

    setattr(mlops.program, "declare_stack", declare_nothing)  # a stand-in: it declares no MLOpsStack
    mlops.cli.main()


def main() -> None:
    if sys.argv[1:2] == [IMPORT_PROGRAM]:
        del sys.argv[1]
        run_with_program_imported()
    else:
        run_without_program()


if __name__ == "__main__":
    main()
