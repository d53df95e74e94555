"""The one rule for a ``data_dir`` the user gives: it must be a folder."""

import os


def require_folder(data_dir: str | None, default: str, how_to_get: str) -> None:
    """FileNotFoundError if ``data_dir`` is given (not None) but is not a folder.

    A mistyped path must be an error, not a quiet fall-back to ``default`` (the
    place a reader uses when data_dir is None). Reads nothing.
    """
    if data_dir is None or os.path.isdir(data_dir):
        return
    problem = "is not a folder" if os.path.exists(data_dir) else "does not exist"
    raise FileNotFoundError(
        f"data_dir={data_dir} {problem} (leave data_dir unset to use {default}). {how_to_get}"
    )
