"""A results folder that was copied or moved works where it is: MLflow records artifact
locations as absolute paths (file:// URIs in its SQLite store), so a copy would read and write
the original's files. `relocate` rewrites them into the folder, once, when a command opens it.
Edits the store's SQLite file directly (MLflow has no relocation of its own).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from harness.tracking.store import default_tracking_uri

# Where MLflow's SQLite store keeps absolute artifact locations (file:// URIs).
_LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def relocate(results: Path, tracking_uri: str) -> str | None:
    """Make a copied or moved results folder self-contained: MLflow records artifact locations
    as absolute paths, so a copy would read and write the original's files. When the store is
    the folder's own SQLite file and its artifact root lies elsewhere, every location under
    the old root is rewritten to the same place under this folder. Returns a note, or None
    when nothing was moved."""
    import sqlite3

    db = Path(results) / "mlflow.db"
    if tracking_uri != default_tracking_uri(results) or not db.is_file():
        return None
    new_root = (Path(results).resolve() / "mlartifacts").as_uri()
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:
        rows = con.execute("SELECT artifact_location FROM experiments").fetchall()
        old_roots = set()
        for (location,) in rows:
            if location and location.startswith("file://") and "/mlartifacts/" in location:
                old = location[: location.rindex("/mlartifacts/")] + "/mlartifacts"
                if old != new_root:
                    old_roots.add(old)
        if not old_roots:
            return None
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        with con:
            for old in sorted(old_roots):
                for table, column in _LOCATIONS:
                    if table in tables:
                        con.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE {column} LIKE ? ESCAPE '\\'",
                            (new_root, len(old) + 1, _like_prefix(old)),
                        )
    moved = ", ".join(
        sorted(o.removeprefix("file://").removesuffix("/mlartifacts") for o in old_roots)
    )
    return (
        f"results folder moved from {moved}: MLflow's artifact locations now point into {results}"
    )


def _like_prefix(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "/%"
