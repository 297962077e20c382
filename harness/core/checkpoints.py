"""The one home of weight files: every `.pt` the harness writes, reads, names, finds or prunes.

What lives here, under a results folder:
- a complete trial's **best weights** (`checkpoints/STUDY/trial-N-best.pt`), kept while the
  retention policy keeps them, and their MLflow copy's artifact folder (`ARTIFACT_DIR`);
- a running or interrupted trial's **resume state** (`resume/STUDY/trial-N.pt`) and the mark
  that a stopping process leaves beside it (`trial-N.stopped`); on shared stores, its copy in
  the trial run's artifacts (`SHARED_STATE_DIR`: `state-EPOCH.pt` with its record
  `state-EPOCH.json`) and the staging folder of its background upload (`trial-N.upload/`);
- the **source models'** cache (`sources/KEY.pt` with `KEY.json`), and their registry copy's
  artifact folder (`SOURCE_ARTIFACT_DIR`);
- a meta-learned initialization written for another study (`save_init`).

Every write is atomic (`files.atomic_write`); every read is `weights_only` (a file that would
run code is refused). The tracking layer moves these files to and from MLflow under the names
given here; nothing else builds a `.pt` path or globs for one (tests/test_architecture.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from harness.config.spec import safe_name
from harness.infra.files import atomic_write

ARTIFACT_DIR = "checkpoints"  # a trial run's artifact folder holding its best weights
SOURCE_ARTIFACT_DIR = "source"  # a source model's run: its weights file
STATE_DICT = "state_dict.pt"  # a registered MLflow PyTorch model, saved as plain weights
WEIGHT_SUFFIXES = (".pt", ".pth")  # what a user's own weights file may be called
SHARED_STATE_DIR = "resume"  # a trial run's artifact folder holding its latest resume state


# --- Names ---------------------------------------------------------------------------------------


def _folder(results: Path, kind: str, study_name: str) -> Path:
    """A study's folder of `kind`; a lookup makes no folder (the writes below make it)."""
    return Path(results) / kind / safe_name(study_name)


def _made(path: Path) -> Path:
    """`path`, its folder made: for the lookups that name a file about to be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def best_weights_path(results: Path, study_name: str, number: int) -> Path:
    """Where a complete trial's best weights live while the retention policy keeps them."""
    return _folder(results, "checkpoints", study_name) / f"trial-{number}-best.pt"


def resume_path(results: Path, study_name: str, number: int) -> Path:
    """The resume state of a running trial: kept while it runs or after it was interrupted."""
    return _folder(results, "resume", study_name) / f"trial-{number}.pt"


def shared_state_names(epoch: int) -> tuple[str, str]:
    """The artifact names (in `SHARED_STATE_DIR`) of a resume state of `epoch` in the shared
    store: (the state, its record: epoch, size, SHA-256, written once the state is whole)."""
    return f"state-{epoch:05d}.pt", f"state-{epoch:05d}.json"


def shared_state_epoch(name: str) -> tuple[int, str] | None:
    """(epoch, "state" or "record") of an artifact name that `shared_state_names` gave."""
    stem, _, suffix = name.rpartition("/")[2].partition(".")
    if not stem.startswith("state-") or not stem[6:].isdigit() or suffix not in ("pt", "json"):
        return None
    return int(stem[6:]), "state" if suffix == "pt" else "record"


def _transfers(resume_file: Path) -> Path:
    """The folder beside a trial's resume file of its shared states in transit: the staged
    uploads and the fetched downloads (`drop_resume` removes it with the state)."""
    return Path(resume_file).with_suffix(".upload")


def upload_staging(resume_file: Path, epoch: int) -> Path:
    """Where the state of `epoch` of a trial's resume file waits for its background upload,
    under its shared name (its folder made)."""
    return _made(_transfers(resume_file) / shared_state_names(epoch)[0])


def fetch_folder(results: Path, study_name: str, number: int) -> Path:
    """Where trial `number` downloads a shared state before it becomes its local cache."""
    return _transfers(resume_path(results, study_name, number))


def adopt(fetched: Path, results: Path, study_name: str, number: int) -> Path:
    """A fetched shared state made trial `number`'s local resume state (this node's cache)."""
    return Path(fetched).replace(_made(resume_path(results, study_name, number)))


def stopped_mark(results: Path, study_name: str, number: int) -> Path:
    """The mark a process stopping for the environment leaves for a trial it was running (its
    folder made: the caller touches it)."""
    return _made(resume_path(results, study_name, number).with_suffix(".stopped"))


def stopped_marks(results: Path, study_name: str) -> dict[int, Path]:
    """The stopped marks of a study in this results folder, by trial number."""
    folder = _folder(results, "resume", study_name)  # none: no marks (glob finds nothing)
    return {int(p.stem.split("-")[1]): p for p in folder.glob("trial-*.stopped")}


def retention_lock(results: Path, study_name: str) -> Path:
    """The lock file the workers sharing a results folder take in turn to apply retention."""
    return _made(_folder(results, "checkpoints", study_name) / ".retention.lock")


def source_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """A cached source model: (its weights, its settings and metrics as JSON)."""
    return Path(cache_dir) / f"{key}.pt", Path(cache_dir) / f"{key}.json"


def source_cached(cache_dir: Path, key: str) -> bool:
    return all(p.is_file() for p in source_paths(cache_dir, key))


def weights_file_in(folder: Path, what: str) -> Path:
    """The one weights file in a downloaded artifact folder. A folder holding none or several
    is an error that names them: `what` says what the folder was fetched for."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise ValueError(
            f"{what} holds {len(files)} .pt/.pth files "
            f"({[f.name for f in files]}); point the URI at one state_dict file"
        )
    return files[0]


def first_weights_file(folder: Path) -> Path | None:
    """A downloaded `ARTIFACT_DIR` folder's weights file, or None when it holds none."""
    files = sorted(Path(folder).glob("*.pt"))
    return files[0] if files else None


# --- Reading and writing -------------------------------------------------------------------------


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state_dict atomically: a failure leaves the previous file and no temporary."""
    return _write(path, lambda f: torch.save(state, f))


def _write(path: str | Path, write) -> Path:
    """`atomic_write` into a folder made first; made again should another worker's tidy-up
    (`drop_resume`) remove it, empty, in between."""
    for attempt in range(3):
        try:
            return atomic_write(_made(Path(path)), write)
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("not reached")


def stage(local: Path, staged: Path) -> Path:
    """`staged` made the same file as `local` now (a hard link, or a copy where the filesystem
    has none): a later atomic write of `local` leaves it as it is."""
    staged.unlink(missing_ok=True)
    try:
        os.link(local, staged)
    except OSError:
        shutil.copyfile(local, staged)
    return staged


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict file, loaded without unpickling code (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_tree(tree: dict, path: str | Path) -> Path:
    """Write a resume state (a plain tree of tensors and containers) atomically."""
    return _write(path, lambda f: torch.save(tree, f))


def load_tree(path: str | Path) -> object:
    """A tree written by `save_tree`, on the CPU, refusing anything but tensors and plain
    containers (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_best(results: Path, study_name: str, number: int, state: dict) -> Path:
    return save_weights(state, best_weights_path(results, study_name, number))


def save_init(state: dict[str, torch.Tensor] | nn.Module, path: str | Path) -> Path:
    """Write a meta-learned initialization (a state_dict, or a model's) as a harness weights file
    that `models.build_model(..., pretrained=path)` and `model.pretrained: PATH` accept."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    state = {k: v.detach().cpu() for k, v in state.items()}
    if not any(k.startswith("net.") for k in state):  # a bare network's state_dict
        state = {f"net.{k}": v for k, v in state.items()}
    return save_weights(state, Path(path))


# --- Moving and pruning --------------------------------------------------------------------------


def take_over_resume(results: Path, study_name: str, old: int, new: int) -> Path | None:
    """A retry takes over the resume state of the attempt it retries (so a stop at any point
    keeps it); None when that attempt left none on this node."""
    old_file = resume_path(results, study_name, old)
    new_file = resume_path(results, study_name, new)
    if not old_file.is_file():
        return None
    old_file.replace(new_file)
    return new_file


def drop_resume(results: Path, study_name: str, number: int) -> None:
    """A trial's resume state gone; the study's resume folder too once empty (and `resume/`)."""
    path = resume_path(results, study_name, number)
    path.unlink(missing_ok=True)
    shutil.rmtree(_transfers(path), ignore_errors=True)
    for folder in (path.parent, path.parent.parent):
        try:
            folder.rmdir()  # only an empty one: another trial's state or mark keeps it
        except OSError:
            break


def drop_best(results: Path, study_name: str, number: int) -> bool:
    """Delete a trial's best-weights file; whether there was one."""
    path = best_weights_path(results, study_name, number)
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed
