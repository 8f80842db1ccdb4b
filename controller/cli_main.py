"""The `tokenpool` console script. Ctrl-C before typer runs the command (while typer, rich and click import and
typer builds the command from the signatures: the first ~0.2 s of every command) ends it quietly with status 130,
as typer ends a command stopped later; it printed a traceback from whichever import it stopped. (The console script
pip writes imports `re` before this module: Ctrl-C in those first ~10 ms is Python's own.)"""


def main():
    try:
        from controller.cli import app

        return app()
    except KeyboardInterrupt:
        return 130
