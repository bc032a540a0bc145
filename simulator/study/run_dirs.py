"""Where a run's results go, and the rule that results on disk are never silently replaced.

* The default run directory is ``<output.dir>/<name>/<strategy>/seed-<seed>``. When ``--set``
  changes what the run computes, the scenario folder gets a short hash of those changes,
  ``<name>-set-<hash>``, so a run with other settings lands beside the earlier one instead of
  on top of it. The changes and the hash are recorded in ``config.yaml`` (``overrides``,
  ``overrides_tag``).
* A run directory that already holds a run (``config.yaml``) is only written again when it is
  the same scenario and that run is unfinished without a checkpoint, or with ``--overwrite``.
  A completed run or one that can be resumed is never replaced silently.
* Settings that do not change the numbers (``resources``: engine, CPUs, Ray address; ``output``)
  are not part of a run's identity: the inline and the Ray engine give the same matrix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..paths import PACKAGED_WEIGHTS

#: sections of a scenario that do not change what a run computes (labels and grids for other
#: runs, where results go, how they are executed)
RESULT_NEUTRAL = ("resources", "output", "compare", "sweep")
#: keys that config.yaml adds next to the resolved scenario
RECORD_KEYS = ("versions", "derived_seeds", "overrides", "overrides_tag", "resolved_paths")
#: scenario keys that hold file-system paths (stored resolved as well, for --resume elsewhere)
PATH_KEYS = ("dataset.path", "dataset.root", "model.pretrained", "strategy.params.text_model")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: the resolved scenario without the result-neutral
    sections and without what config.yaml records beside it."""
    return {k: v for k, v in resolved.items() if k not in RESULT_NEUTRAL and k not in RECORD_KEYS}


def _current_form(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded scenario resolved by today's schema, so keys added since (with their default
    values) do not make an earlier run look different; as recorded if it no longer validates."""
    from ..errors import UserError as _UserError
    from ..scenario import validate_scenario

    raw = {k: v for k, v in recorded.items() if k not in RECORD_KEYS}
    try:
        return validate_scenario(raw).resolved()
    except (_UserError, ValueError, TypeError):
        return raw


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every key whose value differs; ``old`` is what a
    run directory recorded, ``new`` a resolved scenario."""
    a, b = _flat(identity(_current_form(old))), _flat(identity(new))
    return {k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")}


def overrides_of(base: dict[str, Any] | None, resolved: dict[str, Any]) -> dict[str, Any]:
    """The settings ``--set`` changed, as dotted key -> new value, leaving out those that change
    nothing (``--set training.lr=0.01`` when 0.01 is the value already) and result-neutral ones.
    Without a valid ``base`` (the file alone does not validate) every key counts."""
    if base is None:
        return {k: v for k, v in _flat(identity(resolved)).items()}
    return {k: new for k, (_, new) in differences(base, resolved).items()}


def overrides_tag(overrides: dict[str, Any]) -> str:
    """Short, stable hash of the overrides ('' when there are none)."""
    if not overrides:
        return ""
    text = json.dumps(overrides, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def scenario_folder(name: str, tag: str) -> str:
    return f"{name}-set-{tag}" if tag else name


def resolved_paths(resolved: dict[str, Any]) -> dict[str, str]:
    """Absolute forms of the relative paths in the scenario (resolved against the working
    directory, as the run itself resolves them)."""
    flat = _flat(resolved)
    out = {}
    for key in PATH_KEYS:
        value = flat.get(key)
        if key == "model.pretrained" and value in PACKAGED_WEIGHTS:  # a name, not a path
            continue
        if isinstance(value, str) and value and not os.path.isabs(value):
            out[key] = str(Path(value).resolve())
    return out


def read_recorded(config_path: Path) -> dict[str, Any]:
    """The scenario recorded in a run directory's ``config.yaml``, with relative paths replaced
    by the absolute ones recorded beside them (so ``--resume`` works from any directory)."""
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    paths = raw.get("resolved_paths") or {}
    for key in RECORD_KEYS:
        raw.pop(key, None)
    for dotted, absolute in paths.items():
        node = raw
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts[-1] in node:
            node[parts[-1]] = absolute
    return raw


def recorded_state(run_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(config, summary) of what a run directory holds; None for a part that is absent or
    unreadable."""
    config = summary = None
    try:
        if (run_dir / "config.yaml").exists():
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        config = {}
    try:
        if (run_dir / "summary.json").exists():
            summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return config, summary


def describe(diff: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    items = [f"{k}: {old!r} there, {new!r} now" for k, (old, new) in list(diff.items())[:limit]]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(items) + more


def check_run_dir(run_dir: Path, resolved: dict[str, Any], *, overwrite: bool, source: str) -> None:
    """Refuse (UserError, exit 2) to start a run in a directory that holds another run, unless
    ``overwrite``. An unfinished run of the same scenario without a checkpoint (it stopped
    before finishing a task) is started again."""
    if overwrite or not run_dir.is_dir():
        return
    from ..engine.checkpoint import has_checkpoint

    config, summary = recorded_state(run_dir)
    if config is None and summary is None:
        return
    diff = differences(config or {}, resolved)
    if diff:
        raise UserError.single(
            source, "--out",
            f"{run_dir} holds a run of a different scenario ({describe(diff)}); "
            "give another --out, or --overwrite to replace it",
        )
    if summary and summary.get("completed"):
        raise UserError.single(
            source, "--out",
            f"{run_dir} already holds a completed run of this scenario; "
            "give --overwrite to run it again, or another --out",
        )
    if has_checkpoint(run_dir):
        raise UserError.single(
            source, "--out",
            f"{run_dir} holds an interrupted run of this scenario; continue it with "
            f"`protofed run --resume {run_dir}`, or give --overwrite to start over",
        )
