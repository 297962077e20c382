"""What an experiment refers to, resolved before any store is touched: torchvision weights
names and files, state_dict files, registry model and run URIs. A bad one is SpecError (exit
2) naming the key, and nothing is created. Imports no Optuna.
"""

from __future__ import annotations

from pathlib import Path

from harness.config.spec import ExperimentSpec, SpecError, TrialConfig, trial_config
from harness.core import distributed, models
from harness.tracking import registry
from harness.tracking import store as tracking
from harness.tracking.runs import StudyOptions


def starting_configs(spec: ExperimentSpec, config: TrialConfig) -> list[TrialConfig]:
    """The first trial's config and one per `model.pretrained` value the space can sample."""
    configs = [config]
    choice = spec.search.space.get("model.pretrained")
    if choice is not None:
        configs += [trial_config(spec, {"model.pretrained": v}) for v in choice.candidates()]
    return configs


def check_inputs(
    spec: ExperimentSpec, opts: StudyOptions, config: TrialConfig, weights_files: bool = False
) -> None:
    """Resolve what the experiment refers to before any store is touched: a torchvision
    weights name, a state_dict file, a registry model or run URI (in an existing store: none is
    created to look); with `weights_files`, the torchvision weights' files (downloaded where
    the network allows). A bad one is SpecError (exit 2), and nothing is created."""
    distributed.check_devices(config, "train.devices_per_trial (--devices-per-trial)")
    for c in starting_configs(spec, config):
        m = c.model
        kind = m.pretrained_kind
        try:
            if kind == "imagenet":
                weights = models.imagenet_weights(m)
                if weights_files and not models.weights_path(weights).is_file():
                    models.imagenet_state(weights)  # a download, or WeightsUnavailable
            elif weights_files:
                continue
            elif kind == "file" and not Path(m.pretrained).is_file():
                raise ValueError(f"model.pretrained: no such state_dict file {m.pretrained}")
            elif kind == "mlflow":
                uri = opts.tracking()
                if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
                    raise ValueError(
                        f"model.pretrained: {m.pretrained}: there is no MLflow store at "
                        f"{tracking.redact(uri)} to find it in; give the --results or "
                        "--tracking-uri of the study that registered it"
                    )
                registry.check_model_uri(uri, m.pretrained)
        except ValueError as err:
            raise SpecError(str(err)) from None
