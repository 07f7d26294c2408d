"""The fidelity benchmark's suite on the shapes world: seeded cases, baselines wired to the same truth,
and a deterministic subset run through ComfyUI's executor (bench/bench_fidelity.py runs the whole suite)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from realedit.masks.settings import (
    DEFAULT_MASK_LAYERS,
    DEFAULT_MASK_ROWS,
    MASK_LAYER_CHOICES,
    MASK_ROW_CHOICES,
    ZONE_DEFAULTS,
)
from realedit.testbed.shapes_world.demo_tasks import WORLD_ZONE_MASK, score
from realedit.testbed.shapes_world.fidelity import (
    METHODS,
    P2P_NO_SR,
    P2P_NTI,
    SUITE_SEED,
    SWEEPS,
    Summary,
    Sweep,
    ZoneMask,
    beats_baselines,
    cases,
    chosen,
    evaluate,
    mask_iou,
    setting_sweep,
    summarise,
    zone_mask_grid,
    zone_mask_sweep,
    zone_tasks,
)
from realedit.testbed.shapes_world.scene import COLOURS

SUBSET_TASKS, SUBSET_STEPS = 3, 4
# The methods that do not beat their baselines on the committed weights (README.md's fidelity table says by how
# much and why; on the subset as on the 30 tasks). Strict: a method that starts beating them fails its mark, so
# it leaves this list (issue 12).
NOT_BEATING_YET = ("P2P (null-text inversion)", "BARET", "SpecRef", "StyleDiffusion", "Keep Unedited Pixels")
WORKFLOWS = Path(__file__).resolve().parents[1] / "api_workflows"


def test_cases_are_seeded_and_every_baseline_scores_against_the_same_truth():
    for method in METHODS:
        first, again = cases(method, 3), cases(method, 3)
        assert len(first) == 3
        for case, same in zip(first, again):
            assert torch.equal(case.method.truth.expected, same.method.truth.expected)
            assert set(case.baselines) == set(method.baselines)
            for task in case.baselines.values():
                assert torch.equal(task.truth.expected, case.method.truth.expected)
                assert torch.equal(task.truth.region, case.method.truth.region)
            assert case.method.truth.region.any()


def test_specref_cases_carry_the_appearance_only_the_reference_shows():
    method = next(m for m in METHODS if m.name == "SpecRef")
    for case in cases(method, 4):
        task = case.method
        assert task.reference is not None and len(task.photos) == 2
        edited = task.truth.edited.objects
        assert any(o.appearance.word is None for o in edited)  # no caption word names it
        plain = case.baselines[P2P_NO_SR]
        inputs = plain.api_workflow()["11"]["inputs"]
        assert "ref_features" not in inputs and "reference_mask" not in inputs and len(plain.photos) == 1


def test_the_truth_scores_perfectly_and_the_source_does_not():
    task = cases(METHODS[0], 1)[0].method
    perfect, unchanged = score(task, task.truth.expected), score(task, task.truth.source)
    assert perfect.success and math.isinf(perfect.preservation_psnr) and math.isinf(perfect.psnr_to_truth)
    assert not unchanged.success


@pytest.fixture(scope="module")
def subset(shapes_world):
    """Every method and baseline on the CI subset, run once for this module."""
    return {method.name: evaluate(method, SUBSET_TASKS, SUBSET_STEPS, log=lambda line: None) for method in METHODS}


def test_the_subset_runs_every_method_and_baseline(subset):
    assert set(NOT_BEATING_YET) < {method.name for method in METHODS}
    for method in METHODS:
        summaries = subset[method.name]
        assert set(summaries) == {method.name, *method.baselines}
        for name, summary in summaries.items():
            assert summary.failed == 0, (method.name, name)
            assert 0.0 <= summary.success <= 1.0 and not math.isnan(summary.preservation_db)


@pytest.mark.parametrize("method", [
    pytest.param(method, id=method.name, marks=[pytest.mark.xfail(
        strict=True, reason=f"{method.name} does not beat its baselines on the committed shapes world weights "
                            "(README.md's fidelity table); drop it from NOT_BEATING_YET when it does (issue 12)")]
                 if method.name in NOT_BEATING_YET else [])
    for method in METHODS])
def test_each_method_beats_its_baselines_on_its_metric(subset, method):
    verdicts = beats_baselines(method, subset[method.name])
    assert all(verdicts.values()), verdicts


def test_preservation_methods_are_judged_on_the_edits_they_make():
    """An edit not read back scores 0 dB of preservation: a variant that leaves every photo as it was keeps the most
    pixels but loses to one that makes the edits (the median of the kept PSNRs, a missed edit at 0 dB)."""
    from realedit.testbed.shapes_world.demo_tasks import Scores

    undone = summarise([Scores(False, 20.0, 40.0)] * 3)
    done = summarise([Scores(True, 30.0, 25.0), Scores(True, 28.0, 24.0), Scores(False, 20.0, 40.0)])
    assert undone.preservation_db == 40.0 > done.preservation_db == 25.0
    assert undone.kept_db == 0.0 and done.kept_db == 24.0
    assert summarise([Scores(True, 30.0, 25.0), None]).kept_db == 12.5  # a run that raised: 0 dB
    method = next(m for m in METHODS if m.metric == "preservation")
    assert beats_baselines(method, {method.name: done, **{b: undone for b in method.baselines}}) == {
        b: True for b in method.baselines}


def test_mask_iou():
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = a.clone()
    assert mask_iou(a, b) == 1.0  # both empty
    a[:2], b[1:3] = True, True
    assert mask_iou(a, b) == pytest.approx(4 / 12)


def test_the_zone_mask_grid_holds_every_choice_of_the_node():
    grid = zone_mask_grid((0.1, 0.5))
    assert len(grid) == len(set(grid)) == len(MASK_ROW_CHOICES) * len(MASK_LAYER_CHOICES) * 2
    assert {s.mask_rows for s in grid} == set(MASK_ROW_CHOICES) and {s.threshold for s in grid} == {0.1, 0.5}


def test_m_b_from_the_instruction_rows_finds_the_edit_the_empty_text_rows_miss(shapes_world):
    """On the committed IP2P UNet, M_b read as the world's tasks read it (the instruction branch) overlaps the region
    the renderer says an object edit changes far more than the official code's empty-text branches at their default
    T (README.md's sweep over 30 tasks: median IoU 0.40 against 0.12). Background edits change most of the image,
    where any mask that covers it scores well: left out."""
    world = WORLD_ZONE_MASK
    official = ZoneMask(DEFAULT_MASK_ROWS, DEFAULT_MASK_LAYERS, ZONE_DEFAULTS.mask_threshold)
    object_edits = [task for task in zone_tasks(12) if task.truth.region.float().mean() < 0.5][:3]
    assert len(object_edits) == 3
    sweep = zone_mask_sweep(object_edits, SUBSET_STEPS, (world, official))
    assert sweep[world] > 0.2 and sweep[world] > 2 * sweep[official], sweep


def test_every_sweep_sets_inputs_its_node_has_and_lists_its_default():
    import json

    for name, sweep in SWEEPS.items():
        workflow = json.loads((WORKFLOWS / f"{sweep.spec.stem}.json").read_text())
        for node in (sweep.node, *sweep.also):
            inputs = workflow[node]["inputs"]
            assert all(set(values) <= set(inputs) for values in sweep.values.values()), (name, node)
            assert all(inputs[k] == v for k, v in sweep.values[sweep.default].items()), (name, node)  # shipped


def test_the_worlds_null_text_lr_is_a_value_of_its_sweep_chosen_on_other_tasks_than_the_tables():
    from realedit.testbed.shapes_world.demo_tasks import WORLD_NULL_TEXT_LR

    sweep = SWEEPS["p2p-null-text-lr"]
    assert {"learning_rate": WORLD_NULL_TEXT_LR} in sweep.values.values() and sweep.chosen_on != SUITE_SEED
    held_out, table = cases(sweep.spec, 30, sweep.chosen_on), cases(sweep.spec, 30)
    assert not any(torch.equal(a.method.truth.source, b.method.truth.source) for a in held_out for b in table)


def test_per_task_scores_are_logged_for_the_method_and_each_baseline(monkeypatch):
    from realedit.testbed.shapes_world import fidelity

    monkeypatch.setattr(fidelity, "run_task", lambda task, steps: task.truth.expected)  # a perfect edit
    lines: list[str] = []
    method = METHODS[0]
    summaries = evaluate(method, 2, SUBSET_STEPS, log=lines.append, per_task=True)
    assert all(s.success == 1.0 for s in summaries.values())
    assert len(lines) == 2 * len(summaries) and all("read back as asked" in line for line in lines)
    assert evaluate(method, 2, SUBSET_STEPS, log=lines.append) and len(lines) == 2 * len(summaries)  # quiet


def test_kinds_run_exactly_the_suites_tasks_of_those_kinds_numbered_as_in_the_suite(monkeypatch):
    """bench_fidelity --kinds: the suite's own tasks of those kinds (not other draws), logged under their number
    in the whole suite, each variant scored on as many."""
    from realedit.testbed.shapes_world import fidelity

    ran: list = []
    monkeypatch.setattr(fidelity, "run_task", lambda task, steps: ran.append(task) or task.truth.expected)
    method = METHODS[0]  # P2P: recolours, reshapes and background edits
    lines: list[str] = []
    summaries = evaluate(method, 8, SUBSET_STEPS, log=lines.append, per_task=True, kinds=("background",))
    suite = [(i, case) for i, case in enumerate(cases(method, 8)) if case.kind == "background"]
    assert suite and len(suite) < 8
    mine = [task for task in ran if task.stem == method.stem]
    assert [task.truth.instruction for task in mine] == [case.method.truth.instruction for _, case in suite]
    assert [line.split(",")[0] for line in lines if f", {method.name} (" in line] == [
        f"  {method.name} task {i}" for i, _ in suite]
    assert {summary.tasks for summary in summaries.values()} == {len(suite)}


def test_an_ablation_sets_the_methods_own_inputs_and_no_baselines(monkeypatch):
    """bench_fidelity --set: StyleDiffusion without LocalBlend; its P2P baseline (node 8 too, with blend words)
    keeps them, and the world task's other inputs stay."""
    from realedit.testbed.shapes_world import fidelity

    ran: list = []
    monkeypatch.setattr(fidelity, "run_task", lambda task, steps: ran.append(task) or task.truth.expected)
    method = next(m for m in METHODS if m.name == "StyleDiffusion")
    evaluate(method, 2, SUBSET_STEPS, log=lambda line: None, overrides={"8": {"blend_words": ""}})
    suite = cases(method, 2)
    mine = [task for task in ran if task.stem == method.stem]
    assert [task.inputs["8"] for task in mine] == [{**case.method.inputs["8"], "blend_words": ""} for case in suite]
    p2p = [task for task in ran if task.stem == "nulltext_p2p_edit"]
    assert len(p2p) == 2 and all(task.inputs["8"]["blend_words"] for task in p2p)
    assert [task.inputs for task in p2p] == [case.baselines[P2P_NTI].inputs for case in suite]


@pytest.mark.parametrize("overrides, kinds, message", [
    ({"99": {"cfg": 1.0}}, None, "node '99' is not in nulltext_p2p_edit's workflow .*8 RealEditSpecRefEditSampler"),
    ({"8": {"crossreplace": 0.0}}, None, "does not set input 'crossreplace' of node 8 .*cross_replace"),
    ({"8": {"model": 0}}, None, "input 'model' of node 8 .* is a link from node"),
    (None, ("appearance",), "kinds \\['appearance'\\]"),
    (None, ("reshape",), "none of .* first 1 tasks is of the kinds \\['reshape'\\]"),  # task 0: the background
])
def test_an_ablation_that_would_change_nothing_or_break_the_graph_is_refused(overrides, kinds, message):
    with pytest.raises(ValueError, match=message):
        evaluate(METHODS[0], 1, SUBSET_STEPS, overrides=overrides, kinds=kinds)


def test_an_ablations_values_take_the_type_the_workflow_gives_each_input():
    from realedit.testbed.shapes_world.fidelity import ablation_inputs

    p2p = METHODS[0]
    texts = {"8": {"cross_replace": "0", "blend_words": "", "uncond_shared_kv": "true", "map_downscale": "2",
                   "target_text": "true"}, "7": {"learning_rate": "3e-3"}}
    typed = ablation_inputs(p2p, texts)
    assert typed == {"8": {"cross_replace": 0.0, "blend_words": "", "uncond_shared_kv": True, "map_downscale": 2,
                           "target_text": "true"}, "7": {"learning_rate": 0.003}}
    assert type(typed["8"]["cross_replace"]) is float and type(typed["8"]["map_downscale"]) is int
    for (node, name), text, kind in ((("8", "cross_replace"), "abc", "float"), (("8", "uncond_shared_kv"), "1", "bool"),
                                     (("7", "learning_rate"), "nan", "float")):
        with pytest.raises(ValueError, match=f"{node}.{name}='{text}': the workflow's value is .*; give a {kind}"):
            ablation_inputs(p2p, {node: {name: text}})


BENCH = WORKFLOWS.parent / "bench" / "bench_fidelity.py"


def _bench():
    """bench/bench_fidelity.py as a module (its functions; main() is not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_fidelity", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_bench_reads_each_set_as_node_input_and_text():
    bench = _bench()
    assert bench.parse_overrides(["8.cross_replace=0", "8.blend_words=cat, tiger", "8.reweight_words=",
                                  "7.learning_rate=3e-3"]) == {
        "8": {"cross_replace": "0", "blend_words": "cat, tiger", "reweight_words": ""}, "7": {"learning_rate": "3e-3"}}
    with pytest.raises(SystemExit, match="write NODE.INPUT=VALUE"):
        bench.parse_overrides(["cross_replace=0"])
    with pytest.raises(SystemExit, match="8.cross_replace is given twice"):
        bench.parse_overrides(["8.cross_replace=0", "8.cross_replace=0.2"])


def test_the_bench_refuses_an_unknown_method_or_sweep_and_its_help_lists_every_sweep():
    bench = _bench()
    names = [method.name for method in METHODS]
    bench.check_names("--methods", ["ZONE", "BARET"], names)
    listed = "the names are 'P2P \\(null-text inversion\\)', 'BARET'"
    with pytest.raises(SystemExit, match=f"--methods: no 'Zone'; {listed}"):
        bench.check_names("--methods", ["ZONE", "Zone"], names)
    with pytest.raises(SystemExit, match="--sweep: no 'baret-bam'"):
        bench.check_names("--sweep", ["baret-bam"], list(SWEEPS))
    help_text = BENCH.read_text().split("fidelity.SWEEPS: ", 1)[1].split(")\")", 1)[0]  # the --sweep help's list
    assert [name for name in SWEEPS if name not in help_text] == []


def test_unnamed_scenes_caption_no_colour_and_p2ps_blend_words_stay_words_of_its_prompts():
    """bench_fidelity --unnamed 1: every object wears an appearance no word names, so no caption names a colour;
    a recolour of such an object blends its shape word (the caption's only word for it) into the new colour's."""
    method = next(m for m in METHODS if m.stem == "nulltext_p2p_edit")
    suite = cases(method, 12, unnamed=1.0)
    assert {case.kind for case in suite} >= {"recolour", "reshape"}
    for case in suite:
        truth, inputs = case.method.truth, case.method.inputs["8"]
        source, target = (set(caption.replace(",", "").split()) for caption in (truth.source_caption,
                                                                                  truth.target_caption))
        assert not set(COLOURS) & source, truth.source_caption
        prompts = source | target
        assert set(inputs["blend_words"].split(", ")) <= prompts, (inputs["blend_words"], truth.target_caption)
    with pytest.raises(argparse.ArgumentTypeError, match="1.5 is not a chance between 0 and 1"):
        _bench().chance("1.5")


def test_a_sweep_chooses_the_best_value_and_a_tie_keeps_the_default():
    """On success, a lead of one task in the suite is a tie (the default stays); two tasks choose."""
    sweep = Sweep("BARET", "lambda", "7", {"a": {}, "b": {}, "c": {}}, "b")

    def summary(success: float) -> Summary:
        return Summary(success, 20.0, 0.0, 20.0, 0)

    assert chosen(sweep, {"a": summary(0.5), "b": summary(0.2), "c": summary(0.1)}, tasks=10) == "a"
    assert chosen(sweep, {"a": summary(0.5), "b": summary(0.5), "c": summary(0.1)}, tasks=10) == "b"
    assert chosen(sweep, {"a": summary(0.5), "b": summary(0.4), "c": summary(0.1)}, tasks=10) == "b"
    assert chosen(sweep, {"a": summary(0.6), "b": summary(0.4), "c": summary(0.1)}, tasks=10) == "a"
    kept = Sweep("P2P (null-text inversion)", "maps", "8", {"1": {}, "4": {}}, "4")  # judged on kept_db: no slack
    assert chosen(kept, {"1": Summary(0.9, 25.0, 0.0, 20.0, 0, kept_db=23.4),
                         "4": Summary(0.9, 25.0, 0.0, 20.0, 0, kept_db=23.3)}, tasks=30) == "1"


def test_a_setting_sweep_reaches_the_node(shapes_world, monkeypatch):
    """Each value of a sweep reaches its node in the executor: BARET's edit differs between the paper's
    lambda schedule and the rigid one (lambda 1 throughout), on the same task."""
    from realedit.testbed.shapes_world import fidelity

    edits = {}
    real = fidelity.run_task

    def recording(task, steps):
        edits[(task.inputs["7"]["lambda_start"], task.inputs["7"]["lambda_end"])] = image = real(task, steps)
        return image

    monkeypatch.setattr(fidelity, "run_task", recording)
    sweep = Sweep("BARET", "lambda", "7", {"paper": {"lambda_start": 0.8, "lambda_end": 0.1},
                                           "rigid": {"lambda_start": 1.0, "lambda_end": 1.0}}, "paper")
    summaries = setting_sweep(sweep, 1, SUBSET_STEPS, log=lambda line: None)
    assert set(summaries) == {"paper", "rigid"} and all(s.failed == 0 for s in summaries.values())
    assert not torch.equal(edits[(0.8, 0.1)], edits[(1.0, 1.0)])
