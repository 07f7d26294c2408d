"""Batch editing (``python -m realedit.batch``): manifest validation, outputs, resume, local vs Ray.

Rows run on the built-in tiny random-weight model at 64 px with 2 steps; what is compared is exact
(PNG bytes, records' settings and info), since both runs use one torch thread per worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from realedit.batching import BatchOptions, InvalidManifestError, run_batch, validate
from realedit.batching import run as batch_run
from realedit.batching.example import write_example
from realedit.batching.outputs import atomic_write, row_dir

STEPS = 2
SAME = ("status", "settings", "info", "scores", "files", "key")  # what must not depend on where a row ran


def _options(**kw) -> BatchOptions:
    return BatchOptions(threads=1, **kw)


def _outputs(out: Path) -> dict[str, bytes]:
    """Every PNG under ``out/rows`` by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "rows").rglob("*.png"))}


def _records(out: Path) -> dict[str, dict]:
    return {p.parent.name: {k: json.loads(p.read_text()).get(k) for k in SAME}
            for p in (out / "rows").glob("*/record.json")}


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    return write_example(tmp_path_factory.mktemp("example"), size=64, steps=STEPS)


@pytest.fixture(scope="module")
def reference_run(example, tmp_path_factory) -> Path:
    """The manifest run once, locally and uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = run_batch(example, "tiny", out, _options())
    assert summary["failed"] == 0, [r.get("error") for r in summary["rows"]]
    return out


# -- outputs ---------------------------------------------------------------------------------------------------
def test_every_row_writes_its_edit_masks_record_and_the_run_its_summary_and_contact_sheet(example, reference_run):
    rows, problems = validate(example)
    assert not problems and rows
    summary = json.loads((reference_run / "summary.json").read_text())
    assert [r["id"] for r in summary["rows"]] == [r.id for r in rows] and summary["ok"] == len(rows)
    sheet = (reference_run / "contact_sheet.html").read_text()
    for row in rows:
        folder = row_dir(reference_run, row.id)
        record = json.loads((folder / "record.json").read_text())
        assert record["status"] == "ok" and "edit.png" in record["files"]
        assert all((folder / name).is_file() for name in record["files"])
        assert f"rows/{row.id}/edit.png" in sheet
    zone = json.loads((row_dir(reference_run, "zone") / "record.json").read_text())
    assert {"mask_rough.png", "mask_refined.png", "mask_final.png"} <= set(zone["files"])
    assert zone["scores"]["unchanged_outside_mask"] == 1.0  # ZONE keeps the original's pixels bit for bit
    ip2p = json.loads((row_dir(reference_run, "zone-ip2p") / "record.json").read_text())
    assert {"ip2p.png", "mask_rough.png", "mask_final.png"} <= set(ip2p["files"]) and ip2p["info"]["action"] == "change"
    keep = json.loads((row_dir(reference_run, "keep") / "record.json").read_text()) if any(
        r.id == "keep" for r in rows) else None  # where realedit.masks.keep_unedited exists
    if keep is not None:
        assert keep["scores"]["unchanged_outside_mask"] == 1.0 and keep["settings"]["settings"]["align"] is False
    baret = json.loads((row_dir(reference_run, "baret") / "record.json").read_text())
    assert baret["settings"]["steps"] == STEPS and baret["settings"]["ttis_iterations"] == 1
    assert len(baret["info"]["ttis"]["final_losses"]) == STEPS and baret["scores"]["psnr"] > 0


def test_a_rerun_of_a_finished_run_computes_nothing(example, reference_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    monkeypatch.setattr(batch_run, "RowWorker", None)  # any attempt to load the model or run a row fails
    summary = run_batch(example, "tiny", out, _options())
    assert summary["ran"] == 0 and summary["already_done"] == len(validate(example)[0])


# -- resume ----------------------------------------------------------------------------------------------------
def test_a_killed_run_resumes_without_recomputing_finished_rows(example, reference_run, tmp_path, monkeypatch):
    """Kill after k rows (simulated: the run stops after k, and the k-th row's record was never written, as
    when a kill lands between its PNGs and its record), re-run: only the missing rows are computed and the
    result equals the uninterrupted run."""
    out, k = tmp_path / "out", 3
    first = run_batch(example, "tiny", out, _options(limit=k))
    assert first["ran"] == k
    killed = first["rows"][k - 1]["id"]
    (row_dir(out, killed) / "record.json").unlink()
    (row_dir(out, killed) / ".edit.png.1234.tmp").write_bytes(b"half a png")  # a temp file a kill left behind
    stamps = {p: p.stat().st_mtime_ns for p in (out / "rows").rglob("*.png")}

    ran: list[str] = []
    original = batch_run.RowWorker.run
    monkeypatch.setattr(batch_run.RowWorker, "run", lambda self, row: ran.append(row.id) or original(self, row))
    second = run_batch(example, "tiny", out, _options())
    rows = [r.id for r in validate(example)[0]]
    assert ran == [killed] + rows[k:]
    assert second["already_done"] == k - 1
    for path, stamp in stamps.items():
        if path.parent.name != killed:
            assert path.stat().st_mtime_ns == stamp, f"{path} was rewritten"
    assert _outputs(out) == _outputs(reference_run)
    assert _records(out) == _records(reference_run)


def test_ctrl_c_stops_after_the_current_row(example, tmp_path):
    out = tmp_path / "out"

    def interrupt(record: dict) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C during the first row

    job = batch_run.Job(model="tiny", out=str(out), threads=1)
    stop = batch_run.StopFlag()
    rows = validate(example)[0]
    with stop.on_sigint():
        records, _ = batch_run.run_local(rows, job, interrupt, stop)
    assert stop.set and [r["id"] for r in records] == [rows[0].id]
    assert (row_dir(out, rows[0].id) / "record.json").is_file() and not (out / "rows" / rows[1].id).exists()


def test_a_failing_row_records_its_error_and_the_run_goes_on(example, tmp_path, monkeypatch):
    from realedit.hosts import diffusers_batch

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setitem(diffusers_batch.RUNNERS, "baret", broken)
    out = tmp_path / "out"
    summary = run_batch(example, "tiny", out, _options())
    failed = [r for r in summary["rows"] if r["status"] != "ok"]
    assert [r["id"] for r in failed] == ["baret"] and "out of memory" in failed[0]["error"]
    assert summary["ok"] == len(summary["rows"]) - 1
    assert "out of memory" in (out / "contact_sheet.html").read_text()
    monkeypatch.undo()
    again = run_batch(example, "tiny", out, _options())  # a failed row is retried on re-run
    assert again["ran"] == 1 and again["ok"] == 1


# -- validation --------------------------------------------------------------------------------------------------
def _bad_manifest(example: Path, folder: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (48, 48)).save(folder / "small.png")
    good = json.loads(example.read_text().splitlines()[1])  # the baret row
    good["ground_truth"] = str(example.parent / good["ground_truth"])
    src = str(example.parent / "source.png")
    lines = [
        json.dumps({**good, "id": "good", "image": src}),
        json.dumps({**good, "id": "missing", "image": str(folder / "nope.png")}),
        json.dumps({**good, "id": "unknown-method", "method": "magic", "image": src}),
        json.dumps({"id": "word", "method": "specref", "image": src, "prompt": "a red disc",
                    "target": "a blue square", "word": "tiger", "reference": src}),
        json.dumps({"id": "sizes", "method": "zone", "image": src, "edited": str(folder / "small.png"),
                    "mask": src}),
        json.dumps({**good, "id": "override", "image": src, "settings": {"stepz": 3}}),
        json.dumps({**good, "id": "value", "image": src, "settings": {"lambda_start": 2.0}}),
        "{not json",
        json.dumps({**good, "id": "good2", "image": src}),
    ]
    path = folder / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_all_listed_by_line_before_any_model_loads(example, tmp_path, monkeypatch):
    manifest = _bad_manifest(example, tmp_path)
    monkeypatch.setattr(batch_run, "RowWorker", None)
    with pytest.raises(InvalidManifestError) as info:
        run_batch(manifest, "tiny", tmp_path / "out", _options())
    reasons = {p.line: " ".join(p.reasons) for p in info.value.problems}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8]
    assert "does not exist" in reasons[2]
    assert "unknown method 'magic'" in reasons[3]
    assert "'tiger' is not in the target" in reasons[4]
    assert "48x48 but image is 64x64" in reasons[5]
    assert "unknown setting(s) stepz" in reasons[6]
    assert "lambda_start" in reasons[7]
    assert "not valid JSON" in reasons[8]
    assert "line 4 (word)" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_skip_invalid_runs_the_good_rows(example, tmp_path):
    manifest = _bad_manifest(example, tmp_path)
    summary = run_batch(manifest, "tiny", tmp_path / "out", _options(skip_invalid=True))
    assert [r["id"] for r in summary["rows"]] == ["good", "good2"] and summary["ok"] == 2
    assert [p["line"] for p in summary["invalid"]] == [2, 3, 4, 5, 6, 7, 8]
    assert "line 4 (word) not run: the word &#x27;tiger&#x27;" in (tmp_path / "out" / "contact_sheet.html").read_text()
    assert (tmp_path / "out" / "rows" / "good" / "edit.png").read_bytes() == \
        (tmp_path / "out" / "rows" / "good2" / "edit.png").read_bytes()  # same row, same seed, same bytes


def test_a_csv_manifest_reads_as_the_same_rows(example, tmp_path):
    import csv

    rows = [json.loads(line) for line in example.read_text().splitlines()]
    path = example.parent / "manifest_copy.csv"
    columns = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if k == "settings" else ";".join(v) if k == "segments" else v
                             for k, v in r.items()})
    from_csv, problems = validate(path)
    assert not problems
    assert [(r.id, r.method, r.image, r.segments, r.settings) for r in from_csv] == \
        [(r.id, r.method, r.image, r.segments, r.settings) for r in validate(example)[0]]
    assert [r.line for r in from_csv] == list(range(2, len(rows) + 2))  # line 1 is the header


def test_keep_pixels_rows_are_refused_by_name_where_keep_unedited_is_missing(example, tmp_path, monkeypatch):
    from realedit.batching import methods

    monkeypatch.setattr(methods, "keep_pixels_api", lambda: None)
    path = tmp_path / "keep.jsonl"
    path.write_text(json.dumps({"method": "keep-pixels", "image": str(example.parent / "source.png"),
                                "edited": str(example.parent / "edited.png")}) + "\n"
                    + json.dumps({"method": "stylediffusion", "image": str(example.parent / "source.png")}) + "\n")
    _, problems = validate(path)
    assert "'keep-pixels' is not available" in " ".join(problems[0].reasons)
    assert "reserved" in " ".join(problems[1].reasons)


# -- safety ---------------------------------------------------------------------------------------------------------
def test_atomic_write_leaves_the_old_file_whole_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "edit.png"
    atomic_write(target, b"old")

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the temp file and moving it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["edit.png"]  # no temp file left behind
    monkeypatch.undo()
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content"


def test_the_command_validates_only_and_exits_nonzero_on_bad_rows(example, tmp_path, capsys):
    from realedit import batch

    assert batch.main([str(example), "--validate-only"]) == 0
    assert batch.main([str(_bad_manifest(example, tmp_path)), "--validate-only"]) == 1
    err = capsys.readouterr().err
    assert "line 3 (unknown-method): unknown method 'magic'" in err and "line 9" not in err


def test_ray_missing_says_how_to_install(example, tmp_path, monkeypatch, capsys):
    from realedit import batch

    monkeypatch.setattr(batch_run, "ray_available", lambda: False)
    assert batch.main([str(example), "--out", str(tmp_path / "out"), "--ray"]) == 2
    assert "pip install 'realedit[batch]'" in capsys.readouterr().err


# -- null-text + P2P on the diffusers host ------------------------------------------------------------------------
def test_nulltext_rows_edit_with_the_per_step_null_text_embeddings():
    """With every P2P control off, the edit path is CFG sampling from z_T with the target prompt and the
    per-step null-text embeddings: the embedding optimiser's own reconstruction loop with those embeddings."""
    from realedit.attention.settings import P2PSettings, SpecRefSettings
    from realedit.attention.specref import SpecRefControls
    from realedit.hosts.diffusers import DiffusersHost
    from realedit.hosts.diffusers_baret import branch_denoiser, null_text_invert
    from realedit.hosts.diffusers_edit import specref_edit
    from realedit.hosts.diffusers_sampling import use_schedule
    from realedit.inversion.embedding_opt import reconstruct
    from realedit.testbed.diffusers_models import make_ddim_scheduler, make_tiny_diffusers_unet

    # small weights: a random UNet at full scale amplifies batch-layout rounding (batch 4 here, 1 in the loop)
    unet, scheduler = make_tiny_diffusers_unet("sd1", weight_scale=0.1), make_ddim_scheduler()
    g = torch.Generator().manual_seed(0)
    source, target, empty = (torch.randn(1, 77, 64, generator=g) for _ in range(3))
    latent = torch.randn(1, 4, 8, 8, generator=g)
    inversion = null_text_invert(unet, scheduler, latent, source, empty, steps=3, iterations=2)
    controls = SpecRefControls(settings=SpecRefSettings(p2p=P2PSettings(cross_replace=0.0, self_replace=0.0)))
    result = specref_edit(unet, scheduler, inversion, source, target, empty, cfg=inversion.cfg, controls=controls)
    with DiffusersHost(unet, lambda *a: None) as host, torch.no_grad():
        use_schedule(host, inversion.sampling_sigmas, scheduler.alphas_cumprod)
        denoise = branch_denoiser(host, scheduler, inversion.steps)
        expected, _ = reconstruct(denoise, inversion.trajectory, inversion.sigmas, target, list(inversion.embeddings),
                                  inversion.cfg)
        with_empty, _ = reconstruct(denoise, inversion.trajectory, inversion.sigmas, target, empty, inversion.cfg)
    assert torch.allclose(result.latent, expected, rtol=1e-4, atol=1e-5), (result.latent - expected).abs().max()
    assert not torch.allclose(result.latent, with_empty, rtol=1e-4, atol=1e-5)


def test_a_nulltext_rows_learning_rate_reaches_the_inversion_and_decays_as_the_papers(tmp_path, monkeypatch):
    """A nulltext-p2p row's null_text_lr (default the paper's 1e-2) is null-text inversion's Adam lr at the first
    step, decaying as lr * (1 - s / 100); one that is not positive is refused by name before anything runs."""
    from realedit.batching.methods import METHODS
    from realedit.hosts import diffusers_batch

    nulltext = METHODS["nulltext-p2p"]
    assert nulltext.settings({}).null_text_lr == 1e-2
    with pytest.raises(ValueError, match="null_text_lr must be > 0"):
        nulltext.settings({"null_text_lr": 0.0})
    manifest = write_example(tmp_path / "in", size=64, steps=STEPS, methods=("nulltext-p2p",))
    row = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**row, "settings": {**row["settings"], "null_text_lr": 3e-3}}))
    schedules = []
    invert = diffusers_batch.null_text_invert
    monkeypatch.setattr(diffusers_batch, "null_text_invert", lambda *a, lr, **kw: schedules.append(lr) or invert(
        *a, lr=lr, **kw))
    summary = run_batch(manifest, "tiny", tmp_path / "out", _options())
    assert summary["ok"] == 1 and len(schedules) == 1
    assert schedules[0](0) == pytest.approx(3e-3) and schedules[0](50) == pytest.approx(1.5e-3)
    assert _records(tmp_path / "out")[row["id"]]["settings"]["null_text_lr"] == 3e-3


# -- InstructPix2Pix on the diffusers host (ZONE rows without an edit) ------------------------------------------
def test_ip2p_three_way_guidance_at_unit_scales_is_the_instruction_branch_and_m_b_reads_empty_text_rows():
    """s_T = s_I = 1 leaves e(z, c_I, c_T) alone (Eq. 2): equal to Euler sampling with the instruction branch
    only; the recorder saw the two empty-text rows (1 and 2) of every call, never the instruction row."""
    from realedit.hosts.diffusers_ip2p import ip2p_edit
    from realedit.hosts.diffusers_sampling import sample, sampling_sigmas, timestep_for_sigma
    from realedit.masks import IP2PMaskRecorder
    from realedit.testbed.diffusers_models import make_ddim_scheduler, make_tiny_diffusers_unet

    unet, scheduler = make_tiny_diffusers_unet("ip2p", weight_scale=0.1), make_ddim_scheduler()
    g = torch.Generator().manual_seed(1)
    photo, instruction, empty = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), \
        torch.randn(1, 77, 64, generator=g)
    recorder = IP2PMaskRecorder()
    got = ip2p_edit(unet, scheduler, photo, instruction, empty, steps=3, text_cfg=1.0, image_cfg=1.0, seed=5,
                    hook=recorder)
    _, sigmas = sampling_sigmas(scheduler, 3)

    def instruction_only(x, sigma):
        sigma = float(sigma)
        x_ddpm = x / (1 + sigma**2) ** 0.5
        t = torch.tensor(timestep_for_sigma(sigma, scheduler.alphas_cumprod))
        return x - sigma * unet(torch.cat([x_ddpm, photo], 1), t, instruction).sample

    with torch.no_grad():
        expected = sample(instruction_only, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
                          * sigmas[0], sigmas)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()
    assert recorder.recorded and {rows for _, _, rows in recorder.recorded} == {(1, 2)}
    again = ip2p_edit(unet, scheduler, photo, instruction, empty, steps=3, text_cfg=7.5, image_cfg=1.5, seed=5)
    assert not torch.allclose(again, expected, rtol=1e-4, atol=1e-4)  # the guidance scales act


def test_zone_rows_read_m_b_from_the_rows_and_layers_the_node_offers():
    """A zone row's mask_rows / mask_layers are the IP2P Edit Mask node's options (default: the official code's
    empty-text rows at 1/32), its mask_threshold the node's range [-1, 1]; anything else is refused by name."""
    from realedit.batching.methods import METHODS
    from realedit.masks.settings import DEFAULT_MASK_LAYERS, DEFAULT_MASK_ROWS

    zone = METHODS["zone"]
    default = zone.settings({})
    assert (default.mask_rows, default.mask_layers) == (DEFAULT_MASK_ROWS, DEFAULT_MASK_LAYERS)
    chosen = zone.settings({"mask_rows": "instruction", "mask_layers": "1/16 and 1/32", "mask_threshold": -0.1})
    assert (chosen.mask_rows, chosen.mask_layers, chosen.mask_threshold) == ("instruction", "1/16 and 1/32", -0.1)
    for bad, named in (({"mask_rows": "negative"}, "mask_rows must be one of"),
                       ({"mask_layers": "1/8"}, "mask_layers must be one of"),
                       ({"mask_threshold": 1.5}, "mask_threshold must lie in [-1, 1]")):
        with pytest.raises(ValueError, match=named.replace("[", "\\[").replace("]", "\\]")):
            zone.settings(bad)


def test_a_zone_rows_m_b_comes_from_the_rows_it_names_with_a_l_at_the_end_of_text():
    """The diffusers host's recorder for a zone row: the rows and layers it names, A^L at the instruction's
    end-of-text token (the node's rule), not at the last padding key."""
    from realedit.batching.methods import METHODS
    from realedit.hosts.diffusers_batch import zone_recorder

    def tokenize(text):
        return [(i, w) for i, w in enumerate(text.split())]

    default = zone_recorder(METHODS["zone"].settings({}), "make the square green", tokenize)
    assert (default.row_kind, default.downscales, default.last_token) == ("uncond", {4}, 5)
    chosen = zone_recorder(METHODS["zone"].settings({"mask_rows": "instruction", "mask_layers": "1/16 and 1/32"}),
                           "make it green", tokenize)
    assert (chosen.row_kind, chosen.downscales, chosen.last_token) == ("cond", {2, 4}, 4)


def test_zone_rows_without_an_edit_need_an_ip2p_model(example):
    rows, problems = validate(example, ip2p=False)
    assert [p.id for p in problems] == ["zone-ip2p"] and "--ip2p-model" in problems[0].reasons[0]
    assert "zone-ip2p" not in [r.id for r in rows]


# -- Ray -----------------------------------------------------------------------------------------------------------
def test_ray_gives_the_same_outputs_as_the_local_run_row_for_row(example, reference_run, tmp_path):
    """Two model-holding actors on a local Ray instance (num_cpus=2): the same PNG bytes and records."""
    if not batch_run.ray_available():
        pytest.skip("Ray is not installed: pip install 'realedit[batch]' (or 'ray[data]') to run this test")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": batch_run._package_path()}})
    try:
        out = tmp_path / "out"
        summary = run_batch(example, "tiny", out, _options(ray=True, workers=2))
    finally:
        ray.shutdown()
    assert summary["engine"] == "ray" and summary["ok"] == len(validate(example)[0])
    assert len(summary["workers"]) == 2
    assert _outputs(out) == _outputs(reference_run)
    assert _records(out) == _records(reference_run)


# -- models -----------------------------------------------------------------------------------------------------------
def _letter_tokenizer(folder: Path):
    """A real ``CLIPTokenizer`` with a letters-only vocabulary (no merges: every word is spelled out), written
    locally: a diffusers folder with a BPE tokenizer, without a download."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")), len(vocab)


def test_a_diffusers_folder_loads_offline_and_runs_rows(example, tmp_path):
    from diffusers import StableDiffusionPipeline
    from realedit.batching.models import load_tiny, tiny_text_encoder

    tiny = load_tiny(torch.device("cpu"), torch.float32)
    tokenizer, vocab = _letter_tokenizer(tmp_path / "tok")
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny_text_encoder(64, vocab_size=vocab),
                                   tokenizer=tokenizer, unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "model")
    manifest = tmp_path / "rows.jsonl"
    lines = []
    for row in map(json.loads, example.read_text().splitlines()):
        if row["method"] in ("specref", "nulltext-p2p"):
            paths = {k: str(example.parent / row[k]) for k in ("image", "reference", "reference_mask") if k in row}
            lines.append(json.dumps({**row, **paths}))
    manifest.write_text("\n".join(lines) + "\n")
    summary = run_batch(manifest, str(tmp_path / "model"), tmp_path / "out", _options())
    assert summary["ok"] == 2, [r.get("error") for r in summary["rows"]]
    specref = next(r for r in summary["rows"] if r["method"] == "specref")
    assert specref["info"]["sr_attention"]["applied"] > 0  # 'square' found as 6 letter tokens, M_t non-empty
