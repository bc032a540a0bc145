"""FedSA ``anchors: text``: class names from every source format, the packaged MiniLM model (real,
loaded once for the module), text anchors on the server, and the refusals before a run starts.

Needs the ``text`` extra (part of ``test``); the model is the packaged all-MiniLM-L6-v2, never
downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import tiny
from test_data_formats import CIFAR10_NAMES, write_cifar10, write_cifar100, write_idx_set
from test_data_sources import make_image_folder

from simulator.cli import main
from simulator.data.sources import DIGIT_NAMES, load_dataset
from simulator.engine.runner import run_scenario
from simulator.scenario import DatasetConfig, validate_scenario
from simulator.seeding import derive_seed
from simulator.learner.text_encoder import embed_names, packaged_model_dir
from strategies import RunInfo
from strategies.fedsa import FedSA, Params, all_class_anchors, mean_cosine, text_anchors


REPO = Path(__file__).resolve().parents[1]
DIM = 16


def load(source: str, **params):
    return load_dataset(DatasetConfig(source=source, **params), seed=0)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """The packaged model is extracted once into this module's own cache folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PROTOFED_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def digit_embeddings() -> np.ndarray:
    return embed_names(list(DIGIT_NAMES))  # loads the real model (once for the module: cached)


# --------------------------------------------------------------------------- class names of the sources
def test_digit_sources_name_their_classes_in_words():
    assert load("digits").text_names == list(DIGIT_NAMES)
    ds = load("mnist1d", num_samples=400)
    assert ds.text_names == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert ds.class_names == [str(i) for i in range(10)]  # the display names stay the digits
    assert load("synthetic", num_classes=3, dim=2, samples_per_class=4).text_names is None


def test_npz_with_and_without_class_names(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([7, 3, 11], 4)  # labels are remapped in sorted order: 3 -> 0, 7 -> 1, 11 -> 2
    x = rng.normal(size=(len(y), 5))
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    plain = load("npz", path=str(tmp_path / "plain.npz"))
    assert plain.text_names is None and plain.class_names == ["3", "7", "11"]

    np.savez(tmp_path / "named.npz", x=x, y=y, class_names=np.array(["cat", "dog", "eel"]))
    named = load("npz", path=str(tmp_path / "named.npz"))
    assert named.text_names == ["cat", "dog", "eel"] and named.class_names == ["cat", "dog", "eel"]
    # every "dog" sample (original label 7) carries the class id that "dog" names
    np.testing.assert_allclose(np.sort(np.concatenate([named.x_train, named.x_test])[
        np.concatenate([named.y_train, named.y_test]) == named.text_names.index("dog")], axis=0),
        np.sort((x[y == 7] - named.mean) / named.std, axis=0), atol=1e-5)

    np.savez(tmp_path / "bytes.npz", x=x, y=y, x_test=x, y_test=y, class_names=np.array([b"a", b"b", b"c"]))
    assert load("npz", path=str(tmp_path / "bytes.npz")).text_names == ["a", "b", "c"]

    from simulator.errors import FieldError

    for bad, needle in ((np.array(["cat", "dog"]), "2 names but y has 3"), (np.array([1, 2, 3]), "array of strings"),
                        (np.array(["cat", " ", "eel"]), "empty name at position 1"),
                        (np.array(["cat", "dog", "cat"]), "names two classes 'cat' (positions 0 and 2)")):
        np.savez(tmp_path / "bad.npz", x=x, y=y, class_names=bad)
        with pytest.raises(FieldError) as e:
            load("npz", path=str(tmp_path / "bad.npz"))
        assert e.value.field == "dataset.path" and needle in e.value.message and "bad.npz" in e.value.message


def test_image_folder_names_are_the_folder_names(tmp_path):
    make_image_folder(tmp_path, {"b_cat": 2, "a_dog": 3, "c_eel": 2})
    ds = load("folder", path=str(tmp_path), image_size=8)
    assert ds.text_names == ["a_dog", "b_cat", "c_eel"] == ds.class_names


def test_cifar_names_come_from_the_meta_pickles(tmp_path):
    write_cifar10(tmp_path / "c10", per_class=1)
    assert load("cifar10", root=str(tmp_path / "c10")).text_names == CIFAR10_NAMES
    write_cifar100(tmp_path / "c100")
    fine = load("cifar100", root=str(tmp_path / "c100"))
    assert fine.text_names[:3] == ["fine0", "fine1", "fine2"] and len(fine.text_names) == 100
    assert load("cifar100", root=str(tmp_path / "c100"), label_type="coarse").text_names[-1] == "coarse19"


def test_mnist_idx_digit_names_and_fashion_names(tmp_path):
    write_idx_set(tmp_path / "m" / "MNIST" / "raw", gz=False, per_class=2)
    assert load("mnist", root=str(tmp_path / "m")).text_names == list(DIGIT_NAMES)
    write_idx_set(tmp_path / "f" / "FashionMNIST" / "raw", gz=False, per_class=2)
    assert load("fashion_mnist", root=str(tmp_path / "f")).text_names[0] == "T-shirt/top"


# --------------------------------------------------------------------------- the real model
def test_packaged_model_is_extracted_once_atomically():
    d1 = packaged_model_dir()
    d2 = packaged_model_dir()
    assert d1 == d2 and (d1 / "modules.json").is_file() and (d1 / "model.safetensors").stat().st_size > 80e6
    assert not [p for p in d1.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    assert str(d1).startswith(os.environ["PROTOFED_CACHE"])


def test_digit_names_embed_into_distinct_deterministic_anchors(digit_embeddings):
    e = digit_embeddings
    assert e.shape == (10, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    cos = e @ e.T
    np.fill_diagonal(cos, -1)
    assert cos.max() < 0.95  # ten different names, ten different directions
    # a real sentence model: "two" lies nearer its neighbours "one"/"three" than "zero"/"nine" do
    assert DIGIT_NAMES[int(cos[2].argmax())] in ("one", "three")
    assert cos[2, 1] > cos[0, 1] and cos[2, 3] > cos[9, 3] - 0.3

    # each name is embedded on its own: the same vector alone or among others, bit for bit
    np.testing.assert_array_equal(embed_names(["seven"])[0], e[7])
    np.testing.assert_array_equal(embed_names(list(DIGIT_NAMES)), e)

    a = text_anchors(3, list(DIGIT_NAMES), DIM)
    assert a.shape == (10, DIM) and a.dtype == np.float32
    np.testing.assert_array_equal(a, text_anchors(3, list(DIGIT_NAMES), DIM))  # deterministic
    assert not np.allclose(a, text_anchors(4, list(DIGIT_NAMES), DIM))  # the projection follows the run seed
    d = np.linalg.norm(a[:, None] - a[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    # distinct, and scaled like the random anchors g(R) of the same run: every row has their mean norm
    scale = np.linalg.norm(all_class_anchors(3, 10, DIM).astype(np.float64), axis=1).mean()
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), scale, rtol=1e-5)
    assert d.min() > 0.05 * scale
    # the seeded Gaussian projection keeps the names' geometry: cosines correlate with the 384-d ones
    big = text_anchors(3, list(DIGIT_NAMES), 256)
    iu = np.triu_indices(10, 1)
    assert np.corrcoef((e @ e.T)[iu], (big @ big.T / np.outer(*(2 * [np.linalg.norm(big, axis=1)])))[iu])[0, 1] > 0.8
    assert 0.0 < mean_cosine(e) < 1.0


# --------------------------------------------------------------------------- on the server, in a run
def test_text_model_folder_given_by_the_user(tmp_path, digit_embeddings):
    folder = tmp_path / "my-model"
    folder.symlink_to(packaged_model_dir(), target_is_directory=True)  # another path to a real model folder
    np.testing.assert_array_equal(embed_names(list(DIGIT_NAMES), str(folder)), digit_embeddings)
    np.testing.assert_array_equal(text_anchors(1, list(DIGIT_NAMES), DIM, str(folder)), text_anchors(1, list(DIGIT_NAMES), DIM))


def test_text_params_and_server_anchors(digit_embeddings):
    assert Params().anchors == "random" and Params().text_model is None
    run = RunInfo(seed=2, participation=1.0, num_classes=10, embedding_dim=DIM, text_names=list(DIGIT_NAMES))
    np.testing.assert_array_equal(FedSA(Params(), run).initial_anchors, all_class_anchors(2, 10, DIM))  # default unchanged
    np.testing.assert_array_equal(FedSA(Params(anchors="text"), run).initial_anchors, text_anchors(2, list(DIGIT_NAMES), DIM))
    assert FedSA.check_setup(Params(anchors="text"), run) == []
    short = RunInfo(seed=2, participation=1.0, num_classes=11, embedding_dim=DIM, text_names=list(DIGIT_NAMES))
    assert [f for f, _ in FedSA.check_setup(Params(anchors="text"), short)] == ["anchors"]  # a plugin source's bad list
    twice = RunInfo(seed=2, participation=1.0, num_classes=2, embedding_dim=DIM, text_names=["cat", "cat"])
    assert [f for f, _ in FedSA.check_setup(Params(anchors="text"), twice)] == ["anchors"]
    assert FedSA.check_setup(Params(), RunInfo(seed=0, participation=1.0, num_classes=3, embedding_dim=4)) == []


def _digits_fedsa(**params) -> dict:
    return tiny(
        seed=4,
        dataset={"source": "digits"},
        tasks={"initial_classes": 4, "classes_per_task": 3, "class_order": "seeded"},
        clients={"num_clients": 2, "partition": {"scheme": "iid"}},
        training={"rounds_per_task": 1, "local_epochs": 1, "batch_size": 32, "lr": 0.05},
        model={"backbone": "mlp", "embedding_dim": DIM},
        continual={"memory_per_class": 0},
        strategy={"name": "fedsa", "params": {"anchors": "text", **params}},
        output={"save": "global"},
    )


def test_fedsa_text_run_inline_anchor_c_is_named_after_class_c(tmp_path, digit_embeddings):
    raw = _digits_fedsa(anchor_momentum=1.0)  # m = 1: the anchors stay exactly as built
    scenario = validate_scenario(raw)
    outcome = run_scenario(scenario, run_dir=tmp_path / "run", engine="inline", out=None)
    s = outcome.summary
    assert s["completed"] and s["num_tasks"] == 3
    # each task is learned when it arrives (no replay memory here, so earlier tasks are forgotten)
    assert np.diag(outcome.matrix).min() > 0.7, outcome.matrix

    from simulator.data.stream import build_stream

    order = build_stream(scenario).class_order
    assert order != sorted(order)  # the seeded order permutes the classes
    z = np.load(tmp_path / "run" / "final" / "global.npz")
    classes, vectors = z["anchor.classes"], z["anchor.vectors"]
    assert sorted(classes.tolist()) == list(range(10))
    # built independently, one name at a time: row c must come from the name of class c, whatever the order
    proj = np.random.default_rng(derive_seed(4, "fedsa_text_anchors")).standard_normal((384, DIM)) / np.sqrt(DIM)
    scale = np.linalg.norm(all_class_anchors(4, 10, DIM).astype(np.float64), axis=1).mean()
    for c, v in zip(classes.tolist(), vectors):
        z_c = embed_names([DIGIT_NAMES[c]])[0].astype(np.float64) @ proj
        np.testing.assert_allclose(v, z_c / np.linalg.norm(z_c) * scale, rtol=1e-5, atol=1e-5)
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["strategy"]["params"]["anchors"] == "text"


# --------------------------------------------------------------------------- refusals before the run
def _write(tmp_path: Path, raw: dict) -> Path:
    raw = dict(raw, output={"dir": str(tmp_path / "results")})
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_source_without_names_is_refused(tmp_path, capsys):
    path = _write(tmp_path, tiny(strategy={"name": "fedsa", "params": {"anchors": "text"}}))  # synthetic data
    for cmd in (["validate", str(path)], ["run", str(path), "--engine", "inline", "--out", str(tmp_path / "out")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "strategy.params.anchors" in err and "has none" in err
        assert "Traceback" not in err and len(err.splitlines()) < 25
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()


def test_missing_model_path_is_refused(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    raw = _digits_fedsa(text_model=str(missing))
    path = _write(tmp_path, raw)
    assert main(["run", str(path), "--engine", "inline", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "strategy.params.text_model" in err and "folder not found" in err and str(missing) in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    (tmp_path / "not-a-model").mkdir()
    path = _write(tmp_path, _digits_fedsa(text_model=str(tmp_path / "not-a-model")))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "strategy.params.text_model" in err and "not a sentence-transformers model folder" in err


def test_compare_refuses_text_anchors_before_any_run(tmp_path, capsys):
    raw = tiny(compare={"txt": {"name": "fedsa", "params": {"anchors": "text"}}})
    path = _write(tmp_path, raw)
    assert main(["compare", str(path), "--strategies", "proto_avg,txt", "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "strategy.params.anchors" in err and not (tmp_path / "cmp").exists()


# a Python in which the text extra's two packages are not installed: every import finder answers
# "not found" for them (find_spec gives None, import raises ModuleNotFoundError), the rest is untouched
BLOCK_TEXT_EXTRA = """
import sys
class Hide:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sentence_transformers", "all_minilm_l6_v2"):
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
import simulator.cli, strategies, strategies.fedsa  # importable without the extra
sys.exit(simulator.cli.main(sys.argv[1:]))
"""


def test_without_the_text_extra_the_package_imports_and_text_anchors_are_refused(tmp_path):
    path = _write(tmp_path, _digits_fedsa())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", BLOCK_TEXT_EXTRA, "validate", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "strategy.params.anchors" in proc.stderr and "protofed[text]" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    raw = _digits_fedsa()
    raw["strategy"]["params"] = {}
    path = _write(tmp_path, raw)  # random anchors need nothing of the extra
    proc = subprocess.run([sys.executable, "-c", BLOCK_TEXT_EXTRA, "validate", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr
