"""What stays after a run (output.save), vector figures for papers (output.plot_formats,
``protofed plot --format``) and the prototype projection plot. Real inline runs, tiny data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pypdf import PdfReader

import protofed
from helpers import tiny
from simulator.cli import main
from simulator.data.stream import build_stream
from simulator.scenario import validate_scenario


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    raw = tiny(output={"save": "clients", "plot_formats": ["png", "pdf"]},
               strategy={"name": "proto_avg", "params": {"share_weights": False}})
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    return raw, protofed.run(raw, run_dir=run_dir, progress=False)


def test_global_and_client_state_are_saved_and_rebuild_the_model(saved_run):
    raw, result = saved_run
    stream = build_stream(validate_scenario(raw))
    data = stream.dataset
    g = result.global_state()
    assert list(g["proto.classes"]) == list(range(6)) and g["proto.vectors"].shape == (6, 16)
    assert np.isfinite(g["proto.vectors"]).all()
    protos = result.client_prototypes()
    for client in range(3):  # each client's prototype counts are its training samples per class
        idx = np.concatenate([t[client] for t in stream.train_indices])
        expected = np.bincount(data.y_train[idx], minlength=6)
        mine = protos[protos["client"] == client]
        assert dict(zip(mine["class"], mine["count"])) == {c: n for c, n in enumerate(expected) if n > 0}
    # proto_avg's global counts are the summed counts of the last uploads: all the samples of the
    # last task's classes, the replay memory (5 per class per client) for older ones
    summed = protos.groupby("class")["count"].sum()
    last = stream.tasks[-1]
    assert all(int(g["proto.counts"][c]) == int(summed[c]) for c in last)
    assert all(0 < int(g["proto.counts"][c]) <= min(int(summed[c]), 3 * 5) for c in range(6) if c not in last)
    model = result.client_model(2)
    saved = torch.load(result.run_dir / "final" / "clients" / "2.pt", weights_only=False)
    with torch.no_grad():
        feats = model(torch.as_tensor(data.x_test, dtype=torch.float32))
    assert feats.shape == (len(data.x_test), 16)
    # the rebuilt model's embeddings reproduce the saved prototypes on the client's own data
    idx = np.concatenate([t[2] for t in stream.train_indices])
    with torch.no_grad():
        f = model(torch.as_tensor(data.x_train[idx], dtype=torch.float32)).numpy()
    first = int(saved["prototypes"]["classes"][0])
    assert np.allclose(f[data.y_train[idx] == first].mean(0), saved["prototypes"]["vectors"][0], atol=1e-5)
    # nearest local prototype classifies the test set far above chance (1/6): measured 0.65-0.79
    # on the 48 test samples over seeds 1-5; 0.4 is 12 samples
    # below the lowest
    d = ((feats[:, None, :].numpy() - model.prototypes["vectors"][None]) ** 2).sum(-1)
    pred = model.prototypes["classes"][d.argmin(1)]
    assert (pred == data.y_test).mean() > 0.4


def test_pdf_figures_have_text_labels_and_titles(saved_run):
    _, result = saved_run
    plots = result.run_dir / "plots"
    for name in ("forgetting", "accuracy_matrix", "clients", "prototypes"):
        assert (plots / f"{name}.png").is_file() and (plots / f"{name}.pdf").is_file()
    text = PdfReader(plots / "forgetting.pdf").pages[0].extract_text()
    for label in ("tiny", "proto_avg", "global protocol", "accuracy on the task's test set", "task 0"):
        assert label in text, (label, text[:300])
    fonts = PdfReader(plots / "prototypes.pdf").pages[0]["/Resources"]["/Font"]
    subtypes = {str(f.get_object()["/Subtype"]) for f in fonts.values()}
    assert "/Type3" not in subtypes, subtypes  # TrueType (fonttype 42), not glyph drawings
    assert "PC 1" in PdfReader(plots / "prototypes.pdf").pages[0].extract_text()


def test_plot_command_writes_svg_on_request(saved_run, capsys):
    _, result = saved_run
    assert main(["plot", str(result.run_dir), "--format", "svg"]) == 0
    svg = (result.run_dir / "plots" / "accuracy_matrix.svg").read_text()
    assert "after training task k" in svg  # text kept as text (svg.fonttype none)
    assert main(["plot", str(result.run_dir), "--format", "eps"]) == 2
    assert "allowed: png, pdf, svg" in capsys.readouterr().err


def test_save_none_keeps_nothing(tmp_path):
    r = protofed.run(tiny(output={"save": "none"}, training={"rounds_per_task": 1}), run_dir=tmp_path / "r", progress=False)
    assert not (r.run_dir / "final").exists() and not (r.run_dir / "plots" / "prototypes.png").exists()
    assert not (r.run_dir / "plots" / "forgetting.pdf").exists()
    with pytest.raises(protofed.UserError, match="output.save"):
        r.global_state()


def test_prototype_plot_draws_a_seeded_sample_of_many_clients(tmp_path):
    """With thousands of clients the plot draws a fixed sample of them (and says so), drawn as
    collections: per-point artists took minutes for 1000 clients."""
    from simulator.report.prototype_plots import MAX_CLIENTS_SHOWN, _shown_rows, plot_prototypes

    rng = np.random.default_rng(1)
    n, classes = 600, 4
    client = np.repeat(np.arange(n), classes)
    (tmp_path / "final").mkdir()
    np.savez(tmp_path / "final" / "client_prototypes.npz", client=client, classes=np.tile(np.arange(classes), n),
             vectors=rng.normal(size=(n * classes, 8)))
    np.savez(tmp_path / "final" / "global.npz", **{"proto.classes": np.arange(classes), "proto.vectors": rng.normal(size=(classes, 8))})
    rows = _shown_rows(client)
    assert len(np.unique(client[rows])) == MAX_CLIENTS_SHOWN
    assert np.array_equal(rows, _shown_rows(client))  # the same sample every time
    assert plot_prototypes(tmp_path, tmp_path / "p.png") is not None and (tmp_path / "p.png").stat().st_size > 0
    few = np.repeat(np.arange(10), 2)
    assert np.array_equal(_shown_rows(few), np.arange(len(few)))
