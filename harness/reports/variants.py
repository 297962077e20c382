"""The ablation's variants: groups of the searched keys (a key with the keys that depend on it),
and each variant of the best trial's config with one group set back to the baseline's values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.config.spec import ParamSpec, TrialConfig


@dataclass(frozen=True)
class Group:
    """One choice of the best recipe: a searched key and its conditional children (`when`)."""

    keys: tuple[str, ...]  # the leader first
    best: tuple  # their values in the best config
    base: tuple  # and in the baseline's

    @property
    def leader(self) -> str:
        return self.keys[0]

    def values(self, which: tuple) -> dict[str, Any]:
        return dict(zip(self.keys, which, strict=True))

    def short(self) -> str:
        more = f" (+{len(self.keys) - 1} dependent)" if len(self.keys) > 1 else ""
        return f"{self.leader}={_fmt(self.best[0])}{more}"

    def label(self) -> str:
        values = [f"{k}={_fmt(v)}" for k, v in zip(self.keys, self.best, strict=True)]
        text = values[0] + (f" (+ {', '.join(values[1:])})" if len(values) > 1 else "")
        return f"{text}  [baseline: {', '.join(_fmt(v) for v in self.base)}]"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def parents_of(space: dict[str, ParamSpec]) -> dict[str, list[str]]:
    """Each searched key's parents: the keys its `when` names."""
    return {k: list(p.condition()) for k, p in space.items()}


def groups(
    best: dict[str, Any], base: dict[str, Any], parents: dict[str, list[str]], searched: list[str]
) -> list[Group]:
    """The searched keys whose flat values differ between the best and the baseline config,
    each conditional key with the nearest differing key its `when` names (transitively)."""
    diff = [k for k in searched if k != "seed" and best.get(k) != base.get(k)]

    def leader(key: str, seen: tuple = ()) -> str:
        for parent in parents.get(key, ()):
            if parent in diff and parent not in seen:
                return leader(parent, (*seen, key))
        return key

    members: dict[str, list[str]] = {}
    for key in diff:
        members.setdefault(leader(key), []).append(key)
    for head, keys in members.items():  # the leader first, then its children in space order
        keys.sort(key=lambda k: (k != head, diff.index(k)))
    return [
        Group(tuple(ks), tuple(best.get(k) for k in ks), tuple(base.get(k) for k in ks))
        for ks in members.values()
    ]


def with_values(config: TrialConfig, values: dict[str, Any]) -> TrialConfig:
    """`config` with dotted-key values set, validated again."""
    tree = config.model_dump(mode="json")
    for key, value in values.items():
        *parents, last = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return TrialConfig.model_validate(tree)


@dataclass(frozen=True)
class Variant:
    name: str  # best, baseline, loo:KEY, add:KEY
    config: TrialConfig | None  # None: a combination the config checks refuse
    same_as: str | None = None  # an identical config trained under another variant's name
    error: str = ""


def variants(best: TrialConfig, base: TrialConfig, gs: list[Group]) -> list[Variant]:
    out: list[Variant] = []
    built = [("best", lambda: best), ("baseline", lambda: base)]
    for g in gs:
        built.append((f"loo:{g.leader}", lambda g=g: with_values(best, g.values(g.base))))
        built.append((f"add:{g.leader}", lambda g=g: with_values(base, g.values(g.best))))
    seen: dict[str, str] = {}
    for name, make in built:
        try:
            config = make()
        except ValueError as err:  # pydantic's ValidationError and SpecError are ValueErrors
            out.append(Variant(name, None, error=str(err).splitlines()[0][:200]))
            continue
        key = config.model_dump_json()
        out.append(Variant(name, config, same_as=seen.get(key)))
        seen.setdefault(key, name)
    return out
