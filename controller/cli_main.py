"""The `tokenpool` console script. Ctrl-C before typer runs the command (while typer, rich and click import and
typer builds the command from the signatures: the first ~0.2 s of every command) ends it quietly with status 130,
as typer ends a command stopped later; it printed a traceback from whichever import it stopped. (The console script
pip writes imports `re` before this module: Ctrl-C in those first ~10 ms is Python's own.)

Whatever the command, the process then exits with its heap out of the cyclic collector's reach (`gc.freeze`): the
interpreter's teardown rescanned it, ~1.1 s of a busy 2-core host after a `tokenpool serve` stopped during its
start-up said "stopped" (a first run's: py-spy, gc_collect_main), a heap the server freezes only once started."""

import gc


def main():
    try:
        from controller.cli import app

        return app()
    except KeyboardInterrupt:
        return 130
    finally:
        gc.freeze()
