"""What every layer of tokenpool shares and depends on nothing: the environment variables it reads (`env`)."""


def version() -> str:
    """The installed package's version (`tokenpool --version`, GET /version)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("tokenpool")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"
