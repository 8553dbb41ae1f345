"""Processing steps: the number crunching a worker runs, and how they are found.

A step is a function ``f(frame, meta, *, param=default, ...) -> dict`` or a class
whose ``__init__(self, *, param=default, ...)`` builds its tables once and whose
``__call__(self, frame, meta) -> dict`` runs per frame. The returned dict maps
result names to numpy arrays or scalars. Two keys are special:

- ``"frame"``: a corrected frame that replaces the input of the following steps
  (calibration steps do this); it is not emitted as a result.
- a name with a slash, ``"hits/peaks"``, belongs to a derived stream (here ``hits``)
  rather than the worker group's own stream.

Steps are found by name: the built-ins below, the ``tangopipe.steps`` entry points,
or a dotted path ``package.module:function``. Parameters are checked against the
step's keyword-only signature (names, and types where annotated) when the step is
loaded, so a typo in a pipeline file is an error naming the step and parameter.

    >>> from pipelines.steps import load_step
    >>> step = load_step({"roi_stats": {"rois": {"all": [0, 4, 0, 4]}}})
    >>> out = step(frame, {"scan": 1, "index": 0})
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

import numpy as np

Results = dict[str, Any]
StepFunction = Callable[[np.ndarray, dict], Results]

#: Built-in steps: name -> "module:attribute" (imported lazily, so numba kernels
#: of steps a worker does not use are never compiled).
BUILTIN_STEPS: dict[str, str] = {
    "passthrough": "pipelines.steps.basic:passthrough",
    "roi_stats": "pipelines.steps.basic:roi_stats",
    "calibration": "pipelines.steps.calibration:Calibration",
    "roi": "pipelines.steps.roi:RoiStatistics",
    "binning": "pipelines.steps.binning:Binning",
    "photon_count": "pipelines.steps.photon:PhotonCount",
    "threshold": "pipelines.steps.photon:Threshold",
    "hit_finder": "pipelines.steps.hits:HitFinder",
    "centre_of_mass": "pipelines.steps.dpc:CentreOfMass",
    "xrf": "pipelines.steps.xrf:XrfSpectrum",
    "map_position": "pipelines.steps.maps:map_position",
    "sinogram_rows": "pipelines.steps.tomo:sinogram_rows",
    "azimuthal": "pipelines.steps.azimuthal:AzimuthalIntegration",
    "azimuthal2d": "pipelines.steps.azimuthal:Caking",
}


class StepConfigError(ValueError):
    """A step name or parameter in a pipeline definition is wrong."""


def register(name: str, target: str) -> None:
    """Make ``target`` ("module:attr") available as step ``name``."""
    BUILTIN_STEPS[name] = target


def available_steps() -> list[str]:
    names = set(BUILTIN_STEPS)
    names.update(ep.name for ep in entry_points(group="tangopipe.steps"))
    return sorted(names)


def _resolve(name: str) -> Any:
    target = BUILTIN_STEPS.get(name)
    if target is None:
        for ep in entry_points(group="tangopipe.steps"):
            if ep.name == name:
                return ep.load()
    if target is None and (":" in name or "." in name):
        target = name
    if target is None:
        raise StepConfigError(f"unknown step {name!r}; available: {', '.join(available_steps())} (or module:function)")
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise StepConfigError(f"step {name!r}: cannot import {target!r}: {exc}") from exc


def _type_ok(value: Any, annotation: Any) -> bool:
    """A lenient runtime check of JSON/YAML values against an annotation."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    check = origin or annotation
    if check is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if check is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if check in (list, tuple, typing.Sequence):
        return isinstance(value, list | tuple)
    if check in (dict, typing.Mapping, Mapping):
        return isinstance(value, dict)
    if isinstance(check, type):
        return isinstance(value, check)
    return True


def describe_parameters(factory: Any) -> dict[str, dict[str, Any]]:
    """The declared parameters of a step: name -> {default, type} (for GUIs and errors)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: fall back to raw annotations
        hints = {}
    params = {}
    for p in inspect.signature(target).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            params[p.name] = {
                "default": p.default,
                "required": p.default is inspect.Parameter.empty,
                "type": hints.get(p.name, p.annotation),
            }
    return params


def check_parameters(name: str, factory: Any, params: Mapping[str, Any], what: str = "step") -> None:
    """Check ``params`` against the keyword-only signature of ``factory``; raise StepConfigError."""
    declared = describe_parameters(factory)
    for key, value in params.items():
        if key not in declared:
            expected = ", ".join(declared) or "no parameters"
            raise StepConfigError(f"{what} {name!r}: unknown parameter {key!r}; expected {expected}")
        annotation = declared[key]["type"]
        if not _type_ok(value, annotation):
            type_name = getattr(annotation, "__name__", str(annotation))
            raise StepConfigError(f"{what} {name!r}: parameter {key!r} = {value!r} is not a {type_name}")
    missing = [k for k, d in declared.items() if d["required"] and k not in params]
    if missing:
        raise StepConfigError(f"{what} {name!r}: missing required parameter(s) {', '.join(missing)}")


def _split_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and len(spec) == 1:
        name, params = next(iter(spec.items()))
        if params is None:
            params = {}
        if not isinstance(name, str) or not isinstance(params, Mapping):
            raise StepConfigError(f"step {name!r}: parameters must be a mapping, got {params!r}")
        return name, dict(params)
    raise StepConfigError(f"a step is a name or a one-key mapping {{name: {{parameters}}}}, got {spec!r}")


class LoadedStep:
    """A configured step, callable as ``step(frame, meta) -> results``."""

    def __init__(self, name: str, factory: Any, params: dict[str, Any]):
        self.name = name
        self.params = params
        if inspect.isclass(factory):
            try:
                self._call: StepFunction = factory(**params)
            except StepConfigError:
                raise
            except (ValueError, TypeError, OSError) as exc:
                raise StepConfigError(f"step {name!r}: {exc}") from exc
        else:
            fn = factory

            def call(frame: np.ndarray, meta: dict) -> Results:
                return fn(frame, meta, **params)

            self._call = call

    def __call__(self, frame: np.ndarray, meta: dict) -> Results:
        return self._call(frame, meta)

    def __repr__(self) -> str:
        return f"LoadedStep({self.name!r}, {self.params!r})"


def load_step(spec: Any) -> LoadedStep:
    """Build one step from its pipeline-definition form: ``"name"`` or ``{name: {params}}``."""
    name, params = _split_spec(spec)
    factory = _resolve(name)
    check_parameters(name, factory, params)
    return LoadedStep(name, factory, params)


class StepChain:
    """The steps of a worker, run in order on each frame.

    Each step sees the frame as corrected by the steps before it (a ``"frame"``
    result) and the metadata; results of all steps are merged. Two steps giving
    the same result name is a configuration error, reported on the first frame.
    """

    def __init__(self, specs: list[Any] | None):
        if specs is None:
            specs = []
        if not isinstance(specs, list):
            raise StepConfigError(f"steps must be a list, got {type(specs).__name__}")
        self.specs = specs
        self.steps = [load_step(s) for s in specs]
        self._checked = False

    def __call__(self, frame: np.ndarray, meta: dict) -> Results:
        results: Results = {}
        owner: dict[str, str] = {}
        for step in self.steps:
            out = step(frame, meta)
            if not isinstance(out, dict):
                raise TypeError(f"step {step.name!r} returned {type(out).__name__}, expected a dict of results")
            if "frame" in out:
                frame = out.pop("frame")
            if not self._checked:
                for key in out:
                    if key in owner:
                        raise StepConfigError(
                            f"steps {owner[key]!r} and {step.name!r} both produce result {key!r}; rename one"
                        )
                    owner[key] = step.name
            results.update(out)
        self._checked = True
        return results
