"""An experiment file: read as YAML (numbers as numbers), its --set overrides applied,
validated as a whole, its search space checked against the config's keys; its hash."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from harness.config.sections import ParamSpec
from harness.config.spec import (
    ExperimentSpec,
    SpecError,
    describe_error,
    fixed_values,
    leaf_keys,
    set_dotted,
    trial_config,
)


class _Loader(yaml.SafeLoader):
    """PyYAML reads `1e-3` as a string (YAML 1.1); an experiment file means a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _check_space(spec: ExperimentSpec, where: str) -> None:
    if not spec.search.space:
        raise SpecError(f"{where}: search.space: empty; give at least one key to search")
    known = (set(leaf_keys()) | set(fixed_values(spec))) - {"name"}
    seen: dict[str, ParamSpec] = {}
    for key, param in spec.search.space.items():
        at = f"{where}: search.space.{key}"
        if key == "train.devices_per_trial":  # it decides the workers' GPU groups
            raise SpecError(f"{at}: not searchable; set it in the file or --devices-per-trial")
        k = spec.train.devices_per_trial
        if key == "train.batch_size" and k > 1 and param.kind == "int":
            lo, step = param.int_[0], int(param.step or 1)
            if lo % k or step % k:
                raise SpecError(
                    f"{at}: with train.devices_per_trial {k}, every batch size must split over "
                    f"the ranks: give a low bound and a step that are multiples of {k}"
                )
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SpecError(f"{at}: not a key of the experiment file{hint}")
        for value in param.candidates():
            try:
                trial_config(spec, {key: value})
            except SpecError as err:
                raise SpecError(f"{at}: value {value!r} is invalid: {err}") from None
        for cond, allowed in param.condition().items():
            if cond == key or cond not in known:
                raise SpecError(f"{at}: when: {cond} is not a searched key or a file key")
            if cond in spec.search.space and cond not in seen:
                raise SpecError(f"{at}: when: {cond} must be listed before {key} in the space")
            if cond in seen and seen[cond].kind != "categorical":
                rng = seen[cond].candidates()
                bad = [
                    v
                    for v in allowed
                    if seen[cond].kind == "float"
                    or not (isinstance(v, int) and rng[0] <= v <= rng[1])
                ]
                if bad:
                    raise SpecError(
                        f"{at}: when: {cond}={bad[0]!r} can never hold: {cond} is searched as "
                        f"{seen[cond].kind} {rng} (conditions need a categorical, an int in range, "
                        "or a key that is not searched)"
                    )
            choices = seen[cond].categorical if cond in seen else None
            for value in allowed:
                if choices is not None and value not in choices:
                    raise SpecError(f"{at}: when: {cond}={value!r} is not one of {choices}")
                if choices is None and cond not in spec.search.space:
                    try:
                        trial_config(spec, {cond: value})
                    except SpecError as err:
                        raise SpecError(f"{at}: when: {cond}={value!r} is invalid: {err}") from None
        seen[key] = param
    if spec.search.sampler == "grid":
        _check_grid(spec, where)
        if spec.search.warm_start:
            raise SpecError(
                f"{where}: search.warm_start: the grid sampler visits every point of its grid "
                "once; earlier trials cannot guide it (use tpe, random, cmaes or gp)"
            )
    for i, values in enumerate(spec.search.enqueue):
        at = f"{where}: search.enqueue[{i}]"
        for key, value in values.items():
            param = spec.search.space.get(key)
            if param is None:
                raise SpecError(f"{at}: {key} is not a key of search.space")
            if param.kind == "categorical" and value not in param.categorical:
                raise SpecError(f"{at}: {key}={value!r} is not one of {param.categorical}")
            if param.kind != "categorical" and not (
                isinstance(value, int | float)
                and param.candidates()[0] <= value <= param.candidates()[1]
            ):
                raise SpecError(f"{at}: {key}={value!r} is outside {param.candidates()}")
        try:
            trial_config(spec, dict(values))
        except SpecError as err:
            raise SpecError(f"{at}: {err}") from None


def grid_points(spec: ExperimentSpec) -> int:
    n = 1
    for param in spec.search.space.values():
        n *= len(param.categorical or ())
    return n


def _check_grid(spec: ExperimentSpec, where: str) -> None:
    for key, param in spec.search.space.items():
        if param.kind != "categorical" or param.when:
            raise SpecError(
                f"{where}: search.space.{key}: the grid sampler needs categorical keys with no "
                "`when` (list the values to try)"
            )
    most = grid_points(spec) + int(spec.search.baseline)
    if spec.search.n_trials > most:
        raise SpecError(
            f"{where}: search.n_trials: {spec.search.n_trials}, but the grid has "
            f"{grid_points(spec)} points" + (" (+ the baseline)" if spec.search.baseline else "")
        )


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Read, override (`key=value`, YAML-typed) and validate; raise SpecError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such experiment file")
    try:
        tree = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save the experiment file as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: YAML syntax error: {err}") from None
    if not isinstance(tree, dict):
        raise SpecError(f"{path}: the file must be a mapping of sections (name, data, model, ...)")
    where = str(path)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"--set {item}: expected key=value, e.g. train.lr=0.01")
        if key.startswith("search.space"):
            raise SpecError(
                f"--set {item}: edit the search space in the file; --set a key to pin it"
            )
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise SpecError(f"--set {item}: cannot parse the value: {err}") from None
        space = (
            tree.get("search", {}).get("space") if isinstance(tree.get("search"), dict) else None
        )
        if isinstance(space, dict):
            space.pop(key, None)  # pinned: the key leaves the space
        try:
            set_dotted(tree, key, value)
        except SpecError as err:
            raise SpecError(f"--set {item}: {err}") from None
        where = f"{path} (with --set {', '.join(overrides)})"
    try:
        spec = ExperimentSpec.model_validate(tree)
    except ValidationError as err:
        raise SpecError(describe_error(err, where)) from None
    _check_space(spec, where)
    return spec


# Fields added after studies were made with this code: left at their defaults they stay out of
# the hash, so a study made before they existed still opens with the same file.
LATER_FIELDS = (
    ("search", "soup"),
    ("search", "soup_candidates"),
    ("reg", "swa_start"),
    ("reg", "swa_lr"),
)


def spec_hash(spec: ExperimentSpec) -> str:
    """Hash of the resolved spec, less the trial budget (a larger budget extends a study)
    and the `LATER_FIELDS` left at their defaults."""
    tree = spec.model_dump(mode="json", by_alias=True)
    tree["search"].pop("n_trials")
    tree["search"].pop("warm_start")  # how the sampler starts, not what the study is
    for section, key in LATER_FIELDS:
        field = type(getattr(spec, section)).model_fields[key]
        if getattr(getattr(spec, section), key) == field.default:
            tree[section].pop(key, None)
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
