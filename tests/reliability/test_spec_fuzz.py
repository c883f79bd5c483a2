"""Promise 8: fuzzing the pipeline spec. Random and mutated specs, YAML texts and `--set` overrides each give a valid
pipeline or a SpecError that names where the problem is; never another exception, never a hang."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import SpecError
from orchestrator.spec import Pipeline, apply_overrides, bind, validate_raw

BASE = yaml.safe_load((Path(__file__).resolve().parents[2] / "orchestrator" / "default_pipeline.yaml").read_text())
LM = yaml.safe_load((Path(__file__).resolve().parents[2] / "pipelines" / "ag_news_lm.yaml").read_text())
FIELDS = ["name", "seed", "scenario", "domains", "model", "strategy", "training", "evaluation", "tracking", "storage",
          "tune", "epochs", "lr", "buffer_size", "ratio", "source", "kind", "classes", "uri", "hidden", "optimizer",
          "num_workers", "batch_size", "lr_schedule", "on_nonfinite", "every_n_steps", "s3", "endpoint_url", "das",
          "apply_to", "context", "text_columns", "where", "resources", "max_failures", "factory", "path"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(FIELDS), st.sampled_from(["s3://b/x", "file:///tmp/x",
                                                                                    "replay", "ewc", "-1", "1e-3"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)),
                      max_leaves=12)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested dict/list spec."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    """A valid spec (the embedded default or the LM pipeline) with a few of its fields replaced, deleted or added."""
    raw = copy.deepcopy(draw(st.sampled_from([BASE, LM])))
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(_paths(raw)))
        if not path:
            if draw(st.booleans()):
                return draw(values)  # not even a mapping
            continue
        parent = raw
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(FIELDS))] = draw(values)
        else:
            parent.append(draw(values))
    return raw


overrides = st.lists(st.builds(lambda key, value: f"{key}={value}",
                               st.lists(st.one_of(st.sampled_from(FIELDS), st.integers(0, 6).map(str)), min_size=1,
                                        max_size=4).map(".".join),
                               st.one_of(st.text(max_size=10), st.sampled_from(["3", "1e-3", "[1, 2]", "{name: ewc}",
                                                                               "true", "", "{", "]"]))),
                     max_size=3)


def _check(make: Any, sources: tuple[str, ...] = ("fuzz", "--set")) -> None:
    """``make()`` returns a pipeline (whose strategies bind, or are refused with a SpecError), or raises a SpecError
    that names its source (the file, or ``--set``) and lists at least one problem; anything else fails the test."""
    try:
        pipeline = make()
    except SpecError as e:
        assert e.problems and all(isinstance(path, str) and msg for path, msg in e.problems), e.problems
        assert str(e).startswith(sources), str(e)
        return
    assert isinstance(pipeline, Pipeline)
    try:
        bind(pipeline, "fuzz")
    except SpecError as e:
        assert e.problems and str(e).startswith("fuzz"), str(e)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated_specs(), sets=overrides)
def test_mutated_specs_and_overrides_are_valid_or_a_spec_error(raw: Any, sets: list[str]) -> None:
    def make() -> Pipeline:
        if isinstance(raw, dict):
            apply_overrides(raw, sets)
        return validate_raw(raw, "fuzz")

    _check(make)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=200), st.builds(lambda base, cut, junk: base[:cut] + junk + base[cut:],
                                                      st.just(yaml.safe_dump(BASE)), st.integers(0, 800),
                                                      st.text(max_size=8))))
def test_random_yaml_texts_are_valid_or_a_spec_error(tmp_path_factory: Any, text: str) -> None:
    from orchestrator.spec import load_pipeline

    path = tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"
    path.write_text(text)
    _check(lambda: load_pipeline(path), (str(path),))
