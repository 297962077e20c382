"""The soups of a study (`search.soup`, `report STUDY --soup`): the weight average of its
complete trials fine-tuned from the same starting weights, made once and reused.

- **Candidates**: the best `search.soup_candidates` complete trials by the objective
  (`metrics.TIE_RULE`) whose best weights are kept, and that share the task kind, the
  architecture, the starting weights and the data split of the best one. Others are skipped,
  with one line saying how many and why.
- **Uniform soup**: the mean of every candidate. **Greedy soup**: candidates best first, each
  kept only if the soup's val objective does not get worse (`core.soup.greedy`).
- Every soup that is scored has its BatchNorm statistics measured again on the train split.
- Chosen on val only; each soup is tested once. Each is logged as a run under the study's
  parent (`harness.role=soup`), with its ingredients, metrics and test predictions. The
  study's soup (`search.soup`) is registered as a version of the study's model with alias
  `soup`; the alias `best` moves to it only if its val objective beats the best trial's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.config.spec import safe_name
from harness.config.tags import Tag
from harness.core import checkpoints, soup, tasks
from harness.data import datacache
from harness.study.kept import weights_file
from harness.study.retention import ranked_trials
from harness.tracking import registry, runs
from harness.tracking import store as tracking
from harness.tracking.runs import load_config

KINDS = ("uniform", "greedy")
SCORED = ("val_acc", "val_loss")  # what a soup's val objective can be


@dataclass(frozen=True)
class Soup:
    kind: str  # uniform or greedy
    ingredients: tuple[int, ...]  # trial numbers, best first
    metrics: dict[str, float]  # val_acc, val_loss, test_acc, test_loss
    run_id: str
    pred: list[int] = field(default_factory=list, repr=False)  # per test example
    y: list[int] = field(default_factory=list, repr=False)
    reused: bool = False


@dataclass(frozen=True)
class Soups:
    """What a study's soup step gives the report: the soups, the one the study chose, the
    candidates skipped and why, and the seconds it took."""

    soups: tuple[Soup, ...] = ()
    chosen: str = ""  # the kind the study registers (search.soup)
    notes: tuple[str, ...] = ()  # skipped candidates, nothing to average, ...
    seconds: float = 0.0

    def get(self, kind: str) -> Soup | None:
        return next((s for s in self.soups if s.kind == kind), None)


def existing(client, exp_id: str, study_name: str) -> dict[str, Soup]:
    """The soups already made for this study (finished runs tagged `harness.role=soup`)."""
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{Tag.ROLE}` = 'soup' and tags.`{Tag.OPTUNA_STUDY}` = '{study_name}'",
        max_results=100,
    )
    out = {}
    for r in found:
        kind = r.data.tags.get(Tag.SOUP)
        if r.info.status != "FINISHED" or kind in out or "test_acc" not in r.data.metrics:
            continue
        ingredients = tuple(int(n) for n in r.data.tags.get(Tag.SOUP_INGREDIENTS, "").split(","))
        stored = tracking.load_predictions(r.info.run_id) or ([], [])
        out[kind] = Soup(kind, ingredients, dict(r.data.metrics), r.info.run_id, *stored, True)
    return out


def _skip_reason(config, first, run_tags, first_tags) -> str | None:
    if config.task.kind != first.task.kind:
        return "another task kind"
    if config.model.arch != first.model.arch:
        return "another architecture"
    if run_tags.get(Tag.PRETRAINED) != first_tags.get(Tag.PRETRAINED):
        return "other starting weights"
    if run_tags.get(Tag.DATA_HASH) != first_tags.get(Tag.DATA_HASH):
        return "another data split"
    return None


def candidates(client, results: Path, study, name: str, limit: int) -> tuple[list, str]:
    """[(trial number, run id, config, weights file)] of the soup's candidates, best first,
    and one line saying how many complete trials were skipped and why ("" when none was)."""
    out, skipped, first, first_tags, first_state = [], {}, None, None, None
    for t in ranked_trials(study):
        if len(out) == limit:
            break
        run_id = t.user_attrs.get("mlflow_run_id")
        path = weights_file(client, results, name, t.number, run_id) if run_id else None
        if path is None:
            skipped["no kept weights"] = skipped.get("no kept weights", 0) + 1
            continue
        config, tags = load_config(run_id), client.get_run(run_id).data.tags
        why = _skip_reason(config, first, tags, first_tags) if first is not None else None
        if why is None and first is not None:
            why = soup.compatible(first_state, checkpoints.load_weights(path))
            why = None if why is None else f"other parameters ({why})"
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        if first is None:
            first, first_tags, first_state = config, tags, checkpoints.load_weights(path)
        out.append((t.number, run_id, config, path))
    line = ""
    if skipped:
        why = ", ".join(f"{n} with {k}" for k, n in skipped.items())
        line = f"soup: skipped {sum(skipped.values())} complete trials: {why}"
    return out, line


def make(client, results: Path, study, name: str, objective: str, plan: dict) -> Soups:
    """The study's uniform and greedy soups: made from the candidates, or the runs of an
    earlier call reused. `plan`: {"kind": greedy|uniform, "candidates": N}."""
    import time

    started = time.perf_counter()
    parent = study.user_attrs.get("mlflow_parent_run_id", "")
    exp_id = client.get_run(parent).info.experiment_id
    made = existing(client, exp_id, name)
    if all(k in made for k in KINDS):
        chosen_soup = made.get(plan["kind"])
        if chosen_soup is not None:  # the best trial's registration moved `best` back
            registry.alias_run(
                client,
                safe_name(name),
                chosen_soup.run_id,
                _aliases(study, objective, chosen_soup.metrics),
            )
        return Soups(tuple(made[k] for k in KINDS), plan["kind"], (), time.perf_counter() - started)
    chosen, skipped = candidates(client, results, study, name, plan["candidates"])
    notes = [skipped] if skipped else []
    if len(chosen) < 2:
        notes.append(
            f"soup: nothing to average: {len(chosen)} compatible complete trial"
            f"{'s' * (len(chosen) != 1)} with kept weights (a soup needs 2)"
        )
        return Soups((), plan["kind"], tuple(notes), time.perf_counter() - started)
    numbers = [c[0] for c in chosen]
    config = chosen[0][2]
    data = tasks.load_data(config, datacache.under(results))
    model = tasks.build(config, data, None, load_weights=False)
    states = [checkpoints.load_weights(c[3]) for c in chosen]
    metric = objective if objective in SCORED else "val_acc"
    if metric != objective:
        notes.append(
            f"soup: scored by val_acc (the objective {objective} is not measured on a soup)"
        )
    sign = 1.0 if metric == "val_acc" else -1.0

    def measure(state, split: str, n: int):
        model.load_state_dict(state)
        if n > 1:  # one ingredient: the trial's own model, statistics and all
            soup.recompute_bn(model, data.x_train)
        return tasks.split_scores(config, model, data, split)

    def score(state, n: int) -> float:
        return sign * measure(state, "val", n)[0][metric]

    recipes = {"uniform": list(range(len(states)))}
    if "greedy" not in made:
        recipes["greedy"] = soup.greedy(states, score)[0]
    out = []
    for kind in KINDS:
        if kind in made:
            out.append(made[kind])
            continue
        n = len(recipes[kind])
        state = soup.average([states[i] for i in recipes[kind]])
        val = measure(state, "val", n)[0]
        test, pred = measure(state, "test", n)
        ingredients = tuple(numbers[i] for i in recipes[kind])
        tags = {
            **runs.provenance(config),
            Tag.ROLE: "soup",
            Tag.SOUP: kind,
            Tag.SOUP_INGREDIENTS: ",".join(map(str, ingredients)),
            Tag.SOUP_INGREDIENT_RUNS: ",".join(chosen[i][1] for i in recipes[kind]),
            Tag.PARENT_RUN: parent,
            Tag.OPTUNA_STUDY: name,
            Tag.DATA_HASH: data.data_hash,
        }
        run_id = runs.log_soup(client, exp_id, f"soup-{kind}", config, tags, val | test)
        y = data.y_test.cpu().tolist()
        tracking.log_predictions(client, run_id, pred.tolist(), y)
        out.append(Soup(kind, ingredients, val | test, run_id, pred.tolist(), y))
        if kind == plan["kind"]:  # the model as just tested
            cpu = model.to("cpu")
            _register(client, name, kind, run_id, cpu, data, val | test, study, objective)
    return Soups(tuple(out), plan["kind"], tuple(notes), time.perf_counter() - started)


def _aliases(study, objective: str, metrics: dict) -> tuple[str, ...]:
    """`soup`, and `best` too when the soup's val objective beats the best trial's."""
    best = ranked_trials(study)[0]
    value = metrics.get(objective)
    maximize = study.directions[0].name == "MAXIMIZE"
    beats = value is not None and (value > best.values[0] if maximize else value < best.values[0])
    return ("soup", "best") if beats else ("soup",)


def _register(client, name, kind, run_id, model, data, metrics, study, objective) -> None:
    """The study's soup as a version of its model (`_aliases`)."""
    example = data.x_val[:2].cpu().numpy()
    aliases = _aliases(study, objective, metrics)
    what = f"the {kind} soup of study {name}"
    registry.register_model(
        client, safe_name(name), run_id, model, example, metrics, aliases, data.classes, what
    )
