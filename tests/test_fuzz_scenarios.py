"""Property-based fuzzing of scenario files and ``--set`` values through the real CLI.

Every generated input goes through ``simulator.cli.main(["validate", ...])`` in this process
(``validate`` reads the YAML, applies ``--set``, validates the schema, the source's and the
strategy's params, and builds the federated data stream). Whatever the input, the outcome must be
one of the two documented ones (DESIGN.md §4, §6):

* exit 0, stdout starting with ``ok``, no numpy overflow/NaN warning on the way and no NaN or
  infinity anywhere in the resolved scenario, or
* exit 2 and stderr starting with ``error:`` (one screen), never a Python traceback.

The junk is built from YAML-able values (None, bools, small/huge/negative ints, floats including
NaN and infinities, unicode text, path tricks, dates, bytes) nested in lists and mappings whose
keys are random or real key names of the schema (section-aware where it matters), and is spliced
into one of two valid, fast base scenarios (so that valid examples build their data in
milliseconds). Shared subtrees make ``yaml.safe_dump`` write anchors and aliases. Deep nesting
and raw YAML text are fuzzed separately (the YAML dumper itself cannot write 1000-level
structures); every numeric field at every extreme value is checked exhaustively; and the inputs
that once crashed are pinned as plain examples.

Run with ``--hypothesis-show-statistics`` to see how the examples split between exit 0 and 2.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from simulator.cli import load_for_cli, main
from simulator.data.sources import SOURCES
from simulator.learner.backbones import BACKBONES
from simulator.scenario import (
    PARTITION_SCHEMES,
    DirichletPartition,
    PathologicalPartition,
    Scenario,
)
from strategies import STRATEGIES

BASE: dict[str, Any] = {
    "name": "fuzz",
    "seed": 0,
    "dataset": {
        "source": "synthetic", "num_classes": 6, "samples_per_class": 20, "dim": 4, "test_fraction": 0.2,
        "noise": 1.0, "class_sep": 3.0, "data_seed": 0,
    },
    "tasks": {"initial_classes": 2, "classes_per_task": 2, "class_order": "seeded"},
    "clients": {
        "num_clients": 3, "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_size": 1}, "participation": 1.0,
        "dropout": 0.0, "arrival": {"initial_fraction": 1.0, "stale_fraction": 0.0},
    },
    "training": {
        "rounds_per_task": 1, "local_epochs": 1, "batch_size": 8, "lr": 0.05, "momentum": 0.9,
        "weight_decay": 0.0, "grad_clip": 10.0,
    },
    "model": {"backbone": "mlp", "embedding_dim": 8},
    "continual": {"backbone": "train", "feature_distillation": 0.0, "memory_per_class": 0},
    "strategy": {"name": "proto_avg", "params": {"share_weights": False}},
    "evaluation": {"protocol": "global", "every": "round"},
    "resources": {"engine": "inline", "num_cpus_per_client": 1, "num_gpus_per_client": 0.0},
    "output": {"dir": "results"},
    "compare": {"avg": {"name": "fedavg", "params": {}}, "fp": {"name": "fedproto", "params": {"lambda": 1.0}}},
}

# the second base exercises the newer machinery: quantity skew, per-client task orders, late and
# stale clients, faults, a backbone per client group, local evaluation on a client sample
BASE2: dict[str, Any] = {
    "name": "fuzz2",
    "seed": 1,
    "dataset": {"source": "synthetic", "num_classes": 6, "samples_per_class": 20, "dim": 4, "noise": 1.0},
    "tasks": {"initial_classes": 2, "num_tasks": 3, "class_order": [5, 4, 3, 2, 1, 0]},
    "clients": {
        "num_clients": 3,
        "partition": {"scheme": "quantity", "distribution": "power_law", "exponent": 1.5, "min_size": 1},
        "participation": 1.0,
        "task_order": "per_client",
        "arrival": {"at_task": [0, 1, 1], "stale_fraction": 0.0},
        "fault_injection": [{"client": 1, "round": 2, "mode": "raise"}],
    },
    "training": {"rounds_per_task": 1, "batch_size": 8},
    "model": {"backbone": {"mlp": [0, 2], "cnn": [1]}, "embedding_dim": 8},
    "continual": {"backbone": "freeze_after_first_task", "memory_per_class": 2},
    "strategy": {"name": "fedtgp", "params": {"lambda": 1.0, "server_epochs": 1}},
    "evaluation": {"protocol": "local", "clients": 2, "every": "task"},
    "resources": {"engine": "inline"},
    "compare": {"s": {"name": "fpl", "params": {"share_weights": False}}, "t": {"name": "proto_avg"}},
}
BASES = {"base": BASE, "base2": BASE2}


def _field_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Every key name of a pydantic model and of the models nested in it."""
    seen = set() if seen is None else seen
    if model in seen:
        return set()
    seen.add(model)
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
        for sub in _nested_models(field.annotation):
            names |= _field_names(sub, seen)
    return names


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    out: list[type[BaseModel]] = []
    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            out.append(a)
        stack.extend(getattr(a, "__args__", ()) or ())
        stack.extend(getattr(a, "__metadata__", ()) or ())
    return out


def _section_keys() -> dict[str, list[str]]:
    """Key names by the name of the section that holds them (``dataset`` -> every source's keys, ...)."""
    out: dict[str, set[str]] = {"": set(Scenario.model_fields)}
    todo: list[type[BaseModel]] = [Scenario, DirichletPartition, PathologicalPartition]
    done: set[type] = set()
    while todo:
        model = todo.pop()
        if model in done:
            continue
        done.add(model)
        for name, field in model.model_fields.items():
            for sub in _nested_models(field.annotation):
                out.setdefault(name, set()).update(sub.model_fields)
                todo.append(sub)
    out.setdefault("dataset", set()).update(k for spec in SOURCES.values() for k in _field_names(spec.params_model))
    out["params"] = {k for cls in STRATEGIES.values() for k in _field_names(cls.Params)}
    out["compare"] = {"avg", "fp", "s", "t", "x"}
    for label in out["compare"]:
        out[label] = {"name", "params"}
    return {k: sorted(v) for k, v in out.items()}


SECTION_KEYS = _section_keys()
REAL_KEYS = sorted({k for names in SECTION_KEYS.values() for k in names})
REAL_WORDS = sorted(
    set(SOURCES) | set(STRATEGIES) | set(BACKBONES) | set(PARTITION_SCHEMES)
    | {"seeded", "sorted", "global", "local", "round", "task", "ray", "inline", "train", "freeze_after_first_task"}
    | {"raise", "exit", "results", "../evil", "/abs", "a/b", "..", ".", "a\\b", "a\u2215b", "\uff0e\uff0e", ""}
    | {"a\x00b", "x" * 300, "/dev/null"}
)
EXTREME_INTS = [0, 1, 2, 3, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, -(10**30), 10**4000]
EXTREME_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 1.0, 1e-300, 1e6 + 1]

ints = st.integers(-3, 40) | st.sampled_from(EXTREME_INTS) | st.integers(-(2**70), 2**70)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(EXTREME_FLOATS)
texts = st.sampled_from(REAL_WORDS) | st.text(max_size=12) | st.text(st.characters(codec="utf-8"), max_size=6)
leaves = (
    st.none()
    | st.booleans()
    | ints
    | floats
    | texts
    | st.dates(datetime.date(1, 1, 1), datetime.date(9999, 12, 31))
    | st.binary(max_size=4)
)
real_keys = st.sampled_from(REAL_KEYS)
keys = st.one_of(real_keys, real_keys, real_keys, texts | st.integers(-5, 5) | st.none() | st.booleans() | st.floats())
# a plausible-type scalar: what a typo or an over-eager sweep puts into a real field
scalars = st.one_of(
    st.sampled_from(EXTREME_INTS[:-1]), st.sampled_from(EXTREME_FLOATS), st.sampled_from(EXTREME_FLOATS[:5]),
    st.integers(-3, 40), st.booleans(), st.sampled_from(REAL_WORDS), st.none(), st.floats(-2.0, 2.0),
)
junk = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)


# --------------------------------------------------------------------------- helpers
def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) into a nested dict/list, the root included."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def _mutate(data: st.DataObject, tree: dict[str, Any]) -> Any:
    """Apply 1-4 random edits to a copy of ``tree``: replace a subtree with junk, set a leaf to an
    extreme scalar, delete a key, add a (mostly real, section-appropriate) key, or put the same
    junk object in two places (which YAML writes as an anchor and an alias)."""
    tree = copy.deepcopy(tree)
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]), label="edits")):
        paths = _paths(tree)
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["replace", "tweak", "tweak", "tweak", "delete", "add", "add", "alias"]), label="op")
        if not path:  # the root
            if op == "replace":
                tree = data.draw(junk, label="root")
            continue
        parent, last = _get(tree, path[:-1]), path[-1]
        if op == "replace":
            parent[last] = data.draw(junk, label="value")
        elif op == "tweak":  # a leaf of the tree, not any node
            leaf = data.draw(st.sampled_from([p for p in paths if p and not isinstance(_get(tree, p), (dict, list))] or [path]))
            _get(tree, leaf[:-1])[leaf[-1]] = data.draw(scalars, label="scalar")
        elif op == "delete":
            del parent[last]
        elif op == "add":
            target = _get(tree, path)
            real = st.sampled_from(SECTION_KEYS.get(str(last), REAL_KEYS))
            key = data.draw(st.one_of(real, real, real, keys), label="key")
            value = data.draw(scalars | junk, label="value")
            if isinstance(target, dict):
                target[key] = value
            elif isinstance(target, list):
                target.append(value)
            else:
                parent[last] = {key: target}
        else:  # alias: one object, two places
            shared = data.draw(st.lists(leaves, min_size=1, max_size=3) | st.dictionaries(keys, leaves, max_size=3))
            parent[last] = shared
            other = data.draw(st.sampled_from(_paths(tree)), label="other")
            holder = _get(tree, other[:-1]) if other else None
            # shared holds only leaves, so putting it anywhere but into itself cannot make a cycle
            if isinstance(holder, (dict, list)) and holder is not shared and other[:1] != path[:1]:
                holder[other[-1]] = shared
    return tree


def _dump(tree: Any) -> str | None:
    """The junk as YAML text, or None when PyYAML cannot write it (not the simulator's concern)."""
    try:
        return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError):
        return None


def validate(path: Path, sets: list[str] = ()) -> tuple[int, str, str, list[warnings.WarningMessage]]:
    """``protofed validate PATH [--set ...]`` in this process: (exit code, stdout, stderr, warnings)."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        code = main(["validate", str(path), *[f"--set={s}" for s in sets]])
    return code, out.getvalue(), err.getvalue(), caught


def check_outcome(path: Path, sets: list[str] = ()) -> int:
    code, out, err, caught = validate(path, sets)
    event(f"exit {code}")
    if code == 2:
        event("first problem: " + (err.splitlines()[1].split(":")[0].strip() if len(err.splitlines()) > 1 else "?"))
    assert "Traceback" not in out + err, err
    assert code in (0, 2), f"exit {code}\nstdout: {out}\nstderr: {err}"
    if code == 0:
        assert out.startswith("ok"), out
        numeric = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert not numeric, f"valid scenario but numeric trouble: {[str(w.message) for w in numeric]}"
        resolved = load_for_cli(str(path), None, None, list(sets)).resolved()
        bad = [p for p in _paths(resolved) if isinstance(_get(resolved, p), float) and not math.isfinite(_get(resolved, p))]
        assert not bad, f"a valid scenario holds NaN or infinite values at {bad}"
    else:
        assert err.startswith("error:"), err
        assert len(err.splitlines()) <= 30, err  # one screen
    return code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
SMALL = settings(FUZZ, max_examples=100)


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("base", sorted(BASES))
def test_the_base_scenarios_are_valid(workdir: Path, base: str):
    path = workdir / f"{base}.yaml"
    path.write_text(yaml.safe_dump(BASES[base]), encoding="utf-8")
    code, out, err, _ = validate(path)
    assert code == 0, err
    assert out.startswith(f"ok: {BASES[base]['name']}: 3 tasks [2, 2, 2] classes, 3 clients"), out


@FUZZ
@given(data=st.data())
def test_mutated_scenarios_are_valid_or_a_clear_error(workdir: Path, data: st.DataObject):
    text = _dump(_mutate(data, data.draw(st.sampled_from([BASE, BASE2]), label="base")))
    assume(text is not None)
    path = workdir / "mutated.yaml"
    path.write_text(text, encoding="utf-8")
    check_outcome(path)


@SMALL
@given(tree=junk)
def test_arbitrary_yaml_values_are_a_clear_error(workdir: Path, tree: Any):
    text = _dump(tree)
    assume(text is not None)
    path = workdir / "junk.yaml"
    path.write_text(text, encoding="utf-8")
    check_outcome(path)


REAL_SET_KEYS = st.sampled_from(
    [".".join(str(p) for p in path) for path in _paths(BASE) if path and all(isinstance(p, str) for p in path)]
)
SET_KEYS = st.one_of(REAL_SET_KEYS, REAL_SET_KEYS, REAL_SET_KEYS, REAL_SET_KEYS.map(lambda k: k + "." + "x"), st.text(max_size=10))


@SMALL
@given(
    items=st.lists(
        st.tuples(SET_KEYS, junk.map(lambda v: _dump(v) or "") | texts, st.sampled_from(["=", "", "==", " = "])),
        min_size=1,
        max_size=3,
    )
)
def test_set_overrides_are_valid_or_a_clear_error(workdir: Path, items: list[tuple[str, str, str]]):
    path = workdir / "base_for_set.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    sets = [f"{k}{sep}{v.strip()}" for k, v, sep in items]
    check_outcome(path, sets)


@settings(SMALL, max_examples=30)
@given(
    depth=st.integers(50, 4000),
    opener=st.sampled_from(["[", "{a: ", "- "]),
    where=st.sampled_from(["junk", "strategy: {name: proto_avg, params: {share_weights", "compare: {x"]),
    via_set=st.booleans(),
)
def test_deep_nesting_is_a_clear_error(workdir: Path, depth: int, opener: str, where: str, via_set: bool):
    if opener == "- ":
        nested = "".join("\n" + "  " * i + "- " for i in range(depth)) + "1"
    else:
        closer = "]" if opener == "[" else "}"
        nested = opener * depth + "1" + closer * depth
    path = workdir / "deep.yaml"
    if via_set:
        path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
        check_outcome(path, [f"strategy.params.share_weights={nested}"])
        return
    close = "}" * where.count("{")
    if opener == "- ":
        text = f"{where.split(':')[0]}:{nested}\n"
    else:
        text = f"{where}: {nested}{close}\n"
    path.write_text(text, encoding="utf-8")
    assert check_outcome(path) == 2


@SMALL
@given(text=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_raw_text_is_valid_or_a_clear_error(workdir: Path, text: str):
    path = workdir / "raw.yaml"
    path.write_text(text, encoding="utf-8")
    check_outcome(path)


NUMERIC_LEAVES = [
    (base, p)
    for base, tree in BASES.items()
    for p in _paths(tree)
    if p and isinstance(_get(tree, p), (int, float)) and not isinstance(_get(tree, p), bool)
]
EXTREMES = [math.nan, math.inf, -math.inf, 1e308, -1e308, 2**63, -(2**63) - 1, 10**30]


@pytest.mark.parametrize("base, leaf", NUMERIC_LEAVES, ids=[f"{b}:" + ".".join(map(str, p)) for b, p in NUMERIC_LEAVES])
def test_every_number_of_the_bases_at_every_extreme(workdir: Path, base: str, leaf: tuple):
    """The exhaustive corner of the fuzzer: each numeric field of the base scenario set to NaN,
    +-inf, +-1e308 and huge ints, one at a time (random edits reach a given pair too rarely).
    NaN and infinities are always refused; a huge finite value may be legal but must not overflow."""
    path = workdir / "extreme.yaml"
    for value in EXTREMES:
        tree = copy.deepcopy(BASES[base])
        _get(tree, leaf[:-1])[leaf[-1]] = value
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
        code, out, err, caught = validate(path)
        assert "Traceback" not in out + err and code in (0, 2), f"{leaf}={value}: exit {code}\n{out}{err}"
        where = f"{'.'.join(map(str, leaf))}={value!r}"
        if code == 2:
            assert err.startswith("error:"), err
        else:  # a huge finite value may be a legal setting, but it must not break the numbers
            assert not (isinstance(value, float) and not math.isfinite(value)), f"{where} accepted: {out}"
            numeric = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            assert not numeric, f"{where} accepted but: {numeric}"


# --------------------------------------------------------------------------- pinned examples
# Inputs the fuzzer found (or that it reaches too rarely): each was a traceback or a wrong "ok".
PINNED = {
    "huge_int_literal": "seed: " + "9" * 5000 + "\n",
    "huge_int_in_list": "tasks: {class_order: [" + "1" * 5000 + "]}\n",
    "huge_float_literal": "dataset: {source: synthetic, noise: 1e" + "9" * 30 + "}\n",
    "infinite_noise": "dataset: {source: synthetic, num_classes: 4, samples_per_class: 10, dim: 2, noise: .inf}\n",
    "overflowing_noise": "dataset: {source: synthetic, num_classes: 4, samples_per_class: 10, dim: 2, noise: 1.0e+300}\n",
    "infinite_class_sep": "dataset: {source: synthetic, num_classes: 4, samples_per_class: 10, dim: 2, class_sep: .inf}\n",
    "infinite_grad_clip": "training: {grad_clip: .inf}\n",
    "nan_strategy_param": "strategy: {name: fedproto, params: {lambda: .nan}}\n",
    "infinite_strategy_param": "strategy: {name: fedproto, params: {lambda: .inf}}\n",
    "huge_synthetic": "dataset: {source: synthetic, num_classes: 100000, samples_per_class: 10000000, dim: 100000}\n",
    "deep_flow": "seed: " + "[" * 5000 + "]" * 5000 + "\n",
    "cyclic_alias": "strategy: {name: proto_avg, params: &a {share_weights: *a}}\n",
    "cyclic_alias_in_list": "tasks: {class_order: &a [0, *a]}\n",
    "billion_laughs": (
        "a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
        "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
        "strategy: {name: proto_avg, params: {share_weights: *i}}\n"
    ),
    "python_tag": "!!python/object/apply:os.system ['echo pwned']\n",
    # paths the filesystem refuses: a ValueError / OSError inside pathlib
    "nul_in_path": "dataset: {source: npz, path: \"a\\0b\"}\n",
    "too_long_path": "dataset: {source: npz, path: " + "x" * 5000 + "}\n",
    "too_long_name": "dataset: {source: folder, path: /tmp/" + "x" * 300 + "}\n",
    "nul_in_root": "dataset: {source: cifar10, root: \"a\\0b\"}\n",
    # a backbone mapping (model heterogeneity) re-validated bad strategy params: a pydantic traceback
    "hetero_bad_params": "model: {backbone: {mlp: [0], cnn: [1]}}\nclients: {num_clients: 2}\nstrategy: {name: fedtgp, params: {lambda: null}}\n",
    "hetero_bad_compare_params": "model: {backbone: {mlp: [0], cnn: [1]}}\nclients: {num_clients: 2}\ncompare: {x: {name: fedavg, params: {a: 1}}}\n",
    # per-client task orders with late and stale clients left a task to no client: partitioning
    # its samples among zero clients crashed in numpy
    "task_learned_by_nobody": (
        "seed: 1\ndataset: {source: synthetic, num_classes: 6, samples_per_class: 10, dim: 2}\nmodel: {backbone: mlp}\n"
        "clients: {num_clients: 3, task_order: per_client, arrival: {at_task: [0, 2, 2], stale_fraction: 0.9}}\n"
    ),
    "huge_join_step": "clients: {num_clients: 2, arrival: {at_task: [0, 9223372036854775808]}}\n",  # numpy OverflowError
    # ... and checked its client ids in quadratic time (minutes for 20,000 clients, hours for 100,000)
    "hetero_20k_clients": "clients: {num_clients: 20000}\nmodel: {backbone: {mlp: [" + ", ".join(map(str, range(1, 20001))) + "]}}\n",
    "unicode_name": "name: \u00e9t\u00e9\n",
    "unicode_slash_name": "name: a\u2215b\n",
}


@pytest.mark.parametrize("key", sorted(PINNED))
def test_pinned_inputs_are_a_clear_error(workdir: Path, key: str):
    path = workdir / f"pinned_{key}.yaml"
    path.write_text(PINNED[key], encoding="utf-8")
    code, out, err, _ = validate(path)
    assert code == 2, f"{key}: exit {code}\n{out}{err}"
    assert err.startswith(f"error: {path}") and "Traceback" not in err, err


@pytest.mark.parametrize(
    "item",
    ["seed=" + "9" * 5000, "seed=" + "[" * 5000, "strategy.params=&a {x: *a}", "training.lr=.nan", "training.grad_clip=.inf"],
    ids=["huge_int", "deep", "cyclic", "nan", "inf"],
)
def test_pinned_set_values_are_a_clear_error(workdir: Path, item: str):
    path = workdir / "pinned_set_base.yaml"
    path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    code, out, err, _ = validate(path, [item])
    assert code == 2, f"exit {code}\n{out}{err}"
    assert err.startswith("error:") and "Traceback" not in err, err


def test_an_unexpected_error_says_it_is_a_bug_and_exits_1(workdir: Path, monkeypatch, capsys):
    """The last-resort handler in main(): not exit 2 (that means bad input), no traceback on the
    screen, the traceback kept in a file for the bug report."""
    from simulator.engine import runner

    def boom(*args, **kwargs):
        raise ZeroDivisionError("deliberate")

    monkeypatch.setattr(runner, "build_stream_checked", boom)
    path = workdir / "bug.yaml"
    path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: internal error, a bug in protofed: ZeroDivisionError: deliberate"), err
    assert "Traceback" not in out + err
    report = Path(err.split("kept in ")[1].split(" (PROTOFED_DEBUG")[0])
    try:
        assert "Traceback" in report.read_text() and "deliberate" in report.read_text()
    finally:
        report.unlink()
    monkeypatch.setenv("PROTOFED_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["validate", str(path)])
