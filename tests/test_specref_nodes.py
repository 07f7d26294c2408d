"""RealEdit SpecRef Edit Sampler: the shipped workflow runs on the tiny SD1 model with synthetic photos; bad
inputs are clear errors naming the fix, and the documented fallbacks (empty M_t, a stored reference of
another size) behave as documented."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy
ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "api_workflows" / "specref_object_replace.json"
SR_KSAMPLER = ROOT / "api_workflows" / "specref_sr_ksampler.json"
SAMPLER = "11"
SIZE = 128


@pytest.fixture(scope="module")
def tiny(comfy) -> tuple[dict, dict]:
    """The shipped twin at test size (3 steps everywhere) and the synthetic photos for its LoadImage nodes."""
    from realedit.testbed.demo_inputs import tiny_run

    workflow, overrides, _ = tiny_run(json.loads(WORKFLOW.read_text()), size=SIZE, steps=3)
    return workflow, overrides


@pytest.fixture(scope="module")
def workflow(tiny) -> dict:
    return tiny[0]


@pytest.fixture(scope="module")
def overrides(tiny) -> dict:
    return tiny[1]


def test_workflow_gives_edited_latent_and_image_size_masks(runner, overrides, workflow, tmp_path):
    result = runner.run_workflow(workflow, outputs=[SAMPLER, "12"], overrides=overrides, output_dir=tmp_path)
    edited, reconstruction, m_t, blend = result[SAMPLER]
    assert edited["samples"].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert reconstruction["samples"].shape == edited["samples"].shape
    assert torch.isfinite(edited["samples"]).all()
    assert not torch.equal(edited["samples"], reconstruction["samples"])
    for mask in (m_t, blend):
        assert mask.shape == (1, SIZE, SIZE)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert m_t.sum() > 0 and blend.sum() > 0  # the target word drew some attention; LocalBlend ran
    assert result["12"][0].shape == (1, SIZE, SIZE, 3)
    saved = {name for name, ui in result.ui.items() if ui.get("images")}
    assert saved == {"13", "15", "17"}  # edited image, M_t and LocalBlend previews
    assert _sr_calls(result) > 0


def _sr_calls(result) -> int:
    text = result.ui[SAMPLER]["text"][0]
    return int(re.search(r"SR-attention applied in (\d+) calls", text).group(1))


def test_the_edit_sampler_can_apply_sr_attention_to_the_unconditional_rows_too(runner, overrides, workflow,
                                                                               tmp_path):
    """uncond_shared_kv reaches the sampler's SR-attention: the edit changes, the reconstruction path (which
    SR-attention never touches) stays bit-identical."""
    runs = {}
    for shared in (False, True):
        changed = copy.deepcopy(workflow)
        changed[SAMPLER]["inputs"]["uncond_shared_kv"] = shared
        result = runner.run_workflow(changed, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)
        runs[shared] = result[SAMPLER]
    assert torch.equal(runs[False][1]["samples"], runs[True][1]["samples"])
    assert not torch.equal(runs[False][0]["samples"], runs[True][0]["samples"])


def test_live_reference_with_reweight(runner, overrides, workflow, tmp_path):
    live = copy.deepcopy(workflow)
    live["10"]["inputs"]["mode"] = "live"
    live[SAMPLER]["inputs"].update(edit_mode="reweight", reweight_words="tiger", reweight_factor=1.5)
    result = runner.run_workflow(live, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)
    assert torch.isfinite(result[SAMPLER][0]["samples"]).all()
    assert "edit mode reweight" in result.ui[SAMPLER]["text"][0] and _sr_calls(result) > 0


def _other_model(workflow: dict, node: str) -> None:
    workflow["18"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
    workflow[node]["inputs"]["model"] = ["18", 0]


def _sampler(**inputs):
    return lambda workflow, overrides: workflow[SAMPLER]["inputs"].update(inputs)


def _node(node: str, **inputs):
    return lambda workflow, overrides: workflow[node]["inputs"].update(inputs)


def _empty_reference_mask(workflow: dict, overrides: dict) -> None:
    image, mask = overrides["3"]
    overrides["3"] = (image, torch.zeros_like(mask))


def _small_live_reference(workflow: dict, overrides: dict) -> None:
    from realedit.testbed.images import reference_scene

    scene = reference_scene(96, SIZE)  # a 12x16 latent against the source's 16x16
    overrides["3"] = (scene.image, scene.mask)
    workflow["10"]["inputs"]["mode"] = "live"


BAD_INPUTS = {
    "word missing from the prompt": (_sampler(target_words="zebra"),
                                     "the word 'zebra' is not in the prompt 'a photo of a tiger'"),
    "blend word in neither prompt": (_sampler(blend_words="cat, horse"), "'horse' is in neither"),
    "prompt over one 77-token chunk": (_sampler(target_text="a photo of a tiger" + ", very detailed" * 30),
                                       r"has \d+ tokens; word positions are only defined within one CLIP chunk"),
    "reweight without words": (_sampler(edit_mode="reweight", reweight_words=""),
                               "edit_mode 'reweight' needs reweight_words"),
    "replace with unequal word counts": (_sampler(edit_mode="replace", target_text="a photo of a big tiger"),
                                         "the same number of words.*Use Refine"),
    "SR-attention without target words": (_sampler(target_words=""), "needs target_words"),
    "empty reference mask": (_empty_reference_mask, r"reference mask \(M_s\) is empty"),
    "REF_FEATURES from another model": (lambda w, o: _other_model(w, "10"),
                                        "REF_FEATURES was made with a different model"),
    "INVERSION from another model": (lambda w, o: _other_model(w, "9"), "INVERSION was made with a different model"),
    "REF_FEATURES with another step count": (_node("10", steps=4),
                                             "REF_FEATURES was made with 4 steps but this node uses 3"),
    "INVERSION with another step count": (_node("9", steps=4), "INVERSION was made with 4 steps but this node uses 3"),
    "SR layers not in the features": (_sampler(sr_layers="0-1"), r"SR-attention layers \[0, 1\] are not among"),
    "SR layers unreadable": (_sampler(sr_layers="last three"), "give layer indices like"),
    "subtract words without blend words": (_sampler(blend_words="", blend_subtract_words="cat"),
                                           "blend_subtract_words need blend_words"),
    "maps from layers the model lacks": (_sampler(map_downscale=3),
                                         r"no attention layers at map_downscale 3; its attention layers sit at"),
    "live reference of another size": (_small_live_reference,
                                       "live REF_FEATURES need a reference latent of the source's size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error(runner, overrides, workflow, tmp_path, case):
    change, message = BAD_INPUTS[case]
    bad, bad_overrides = copy.deepcopy(workflow), dict(overrides)
    change(bad, bad_overrides)
    with pytest.raises(runner.WorkflowError, match=message):
        runner.run_workflow(bad, outputs=[SAMPLER], overrides=bad_overrides, output_dir=tmp_path)


def test_empty_target_word_map_falls_back_to_the_edit_without_reference(runner, overrides, workflow, tmp_path):
    """Documented fallback: where M_t is empty (here everywhere: threshold 1 on a [0, 1] map) SR-attention
    leaves the edit path its own attention (Eq. 3 with M_t = 0), so without P2P self-replacement (which the
    SR windows never take, as in the official code) the result is the edit without REF_FEATURES, and the
    node says so."""
    empty = copy.deepcopy(workflow)
    empty[SAMPLER]["inputs"].update(mt_threshold=1.0, self_replace=0.0)
    without = copy.deepcopy(empty)
    del without[SAMPLER]["inputs"]["ref_features"], without[SAMPLER]["inputs"]["reference_mask"]
    a = runner.run_workflow(empty, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)
    b = runner.run_workflow(without, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)
    assert torch.equal(a[SAMPLER][0]["samples"], b[SAMPLER][0]["samples"])
    text = a.ui[SAMPLER]["text"][0]
    assert _sr_calls(a) == 0 and "M_t was empty at every SR-attention call" in text


def test_map_downscale_chooses_the_layers_the_word_maps_are_read_from(runner, overrides, workflow, tmp_path):
    """M_t and LocalBlend's mask come from the layers at ``map_downscale``: other layers give other masks (and so
    another edit), while the reconstruction path, which reads no map, stays bit-identical."""
    runs = {}
    for downscale in (1, 4):
        changed = copy.deepcopy(workflow)
        changed[SAMPLER]["inputs"]["map_downscale"] = downscale
        runs[downscale] = runner.run_workflow(changed, outputs=[SAMPLER], overrides=overrides,
                                              output_dir=tmp_path)[SAMPLER]
    assert torch.equal(runs[1][1]["samples"], runs[4][1]["samples"])
    assert not torch.equal(runs[1][2], runs[4][2]) or not torch.equal(runs[1][3], runs[4][3])
    assert not torch.equal(runs[1][0]["samples"], runs[4][0]["samples"])


def test_stored_reference_of_another_size_is_used_on_its_own_grid(runner, overrides, workflow, tmp_path):
    """Documented: stored features may come from a reference photo of another size; M_s is resized to the
    reference's own token grid at every layer."""
    from realedit.testbed.images import reference_scene

    scene = reference_scene(96, SIZE)
    result = runner.run_workflow(workflow, outputs=[SAMPLER], overrides={**overrides, "3": (scene.image, scene.mask)},
                                 output_dir=tmp_path)
    assert _sr_calls(result) > 0 and torch.isfinite(result[SAMPLER][0]["samples"]).all()


def test_a_reference_mask_of_another_aspect_ratio_warns_through_the_executor(runner, overrides, workflow, tmp_path,
                                                                             caplog):
    """A 96x128 reference photo given a square mask (e.g. the source photo's): stretched as before, but now
    with a warning naming the likely mistake; the photo's own mask (any resolution) gives none."""
    from realedit.testbed.images import reference_scene

    scene = reference_scene(96, SIZE)
    for mask, warns in ((torch.ones(1, SIZE, SIZE), True), (scene.mask, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="realedit"):
            runner.run_workflow(workflow, outputs=[SAMPLER], overrides={**overrides, "3": (scene.image, mask)},
                                output_dir=tmp_path)
        assert any("almost always the wrong mask" in r.getMessage() for r in caplog.records) == warns


def test_clip_tokenizer_strips_weights_and_matches_plain_text(comfy):
    from realedit.attention.tokens import word_token_indices
    from realedit.nodes.specref import clip_tokenizer
    from realedit.testbed.comfy_models import make_tiny_clip

    tokenize = clip_tokenizer(make_tiny_clip())
    assert tokenize("a (cat:1.3) photo") == tokenize("a cat photo")
    assert word_token_indices("a (cat:1.3), photo", "cat", tokenize) == [2]


# -- RealEdit Apply SR-Attention with ComfyUI's KSampler ---------------------------------------------------------
def _sr_graph(workflow: dict, mt_threshold: float = 0.5, sampler_steps: int = 3, mode: str = "stored") -> dict:
    """The twin's loader, reference features and prompts; Apply SR-Attention (#20) feeding ComfyUI's KSampler
    (#22) from an empty latent, beside the same KSampler on the loaded MODEL (#23)."""
    graph = {k: copy.deepcopy(workflow[k]) for k in ("1", "2", "3", "5", "7", "8", "10")}
    graph["10"]["inputs"].update(mode=mode, dtype="fp32")
    ksampler = {"seed": 1, "steps": sampler_steps, "cfg": 7.5, "sampler_name": "euler", "scheduler": "ddim_uniform",
                "denoise": 1.0, "positive": ["19", 0], "negative": ["8", 0], "latent_image": ["21", 0]}
    graph.update({
        "19": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a tiger", "clip": ["1", 1]}},
        "20": {"class_type": "RealEditApplySRAttention", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "ref_features": ["10", 0], "target_text": "a photo of a tiger",
            "target_words": "tiger", "mt_threshold": mt_threshold, "ms_threshold": 0.5, "uncond_shared_kv": False,
            "reference_mask": ["3", 1]}},
        "21": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "22": {"class_type": "KSampler", "inputs": {**ksampler, "model": ["20", 0]}},
        "23": {"class_type": "KSampler", "inputs": {**ksampler, "model": ["1", 0]}},
    })
    return graph


def test_apply_sr_attention_with_ksampler(runner, overrides, workflow):
    off = runner.run_workflow(_sr_graph(workflow, mt_threshold=1.0), outputs=["22", "23"], overrides=overrides)
    assert torch.equal(off["22"][0]["samples"], off["23"][0]["samples"])  # M_t empty: KSampler unchanged
    on = runner.run_workflow(_sr_graph(workflow), outputs=["20", "22", "23"], overrides=overrides)
    assert torch.equal(on["23"][0]["samples"], off["23"][0]["samples"])  # the loaded MODEL stays unpatched
    assert not torch.equal(on["22"][0]["samples"], on["23"][0]["samples"])
    assert "M_t from the words ['tiger'] at tokens [5]" in on.ui["20"]["text"][0]


def test_a_step_count_ddim_uniform_runs_one_more_of_edits_as_comfyuis_ksampler_does(runner, overrides, workflow):
    """ComfyUI's ddim_uniform runs one step more for a count that does not divide its 1000 timesteps evenly (7 for 6;
    31 for the StyleDiffusion workflow's 30, which every run refused): the same steps on every node edit along the
    inversion's 7 steps, another count is refused naming the 6 the inversion was given, and Apply SR-Attention
    names the 6 a KSampler must be given to run the features' schedule."""
    six = copy.deepcopy(workflow)
    for node in six.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 6
    result = runner.run_workflow(six, outputs=["9", SAMPLER], overrides=overrides)
    inversion = result["9"][1]
    assert (inversion.steps, inversion.steps_asked) == (7, 6)
    assert torch.isfinite(result[SAMPLER][0]["samples"]).all()
    graph = _sr_graph(six, sampler_steps=6)
    on = runner.run_workflow(graph, outputs=["20", "22"], overrides=overrides)
    assert "Sample with 6 steps of the reference's scheduler" in on.ui["20"]["text"][0]
    six[SAMPLER]["inputs"]["steps"] = 7
    with pytest.raises(runner.WorkflowError, match="INVERSION was made with 6 steps but this node uses 7"):
        runner.run_workflow(six, outputs=[SAMPLER], overrides=overrides)


@pytest.mark.parametrize("change, message", [
    ({"sampler_steps": 4}, "the sampler runs 4 steps"),
    ({"mode": "live"}, "needs stored REF_FEATURES"),
])
def test_apply_sr_attention_refuses_what_it_cannot_use(runner, overrides, workflow, change, message):
    with pytest.raises(runner.WorkflowError, match=message):
        runner.run_workflow(_sr_graph(workflow, **change), outputs=["22"], overrides=overrides)


def test_apply_sr_attention_input_errors(runner, overrides, workflow):
    graph = _sr_graph(workflow)
    graph["20"]["inputs"]["target_words"] = "zebra"
    with pytest.raises(runner.WorkflowError, match="'zebra' is not in the prompt 'a photo of a tiger'"):
        runner.run_workflow(graph, outputs=["22"], overrides=overrides)
    graph["20"]["inputs"].update(target_words="tiger", map_downscale=3)
    with pytest.raises(runner.WorkflowError, match="no attention layers at map_downscale 3"):
        runner.run_workflow(graph, outputs=["22"], overrides=overrides)
    del graph["20"]["inputs"]["map_downscale"]
    graph["20"]["inputs"]["target_words"] = ""
    with pytest.raises(runner.WorkflowError, match="needs target_words"):
        runner.run_workflow(graph, outputs=["22"], overrides=overrides)
    empty = dict(overrides)
    _empty_reference_mask(graph, empty)
    graph["20"]["inputs"]["target_words"] = "tiger"
    with pytest.raises(runner.WorkflowError, match="reference mask \\(M_s\\) is empty"):
        runner.run_workflow(graph, outputs=["22"], overrides=empty)


def test_sr_ksampler_workflow_edits_from_z_T_and_previews_the_word_map(runner, tmp_path):
    """The shipped one-path workflow: DDIM Invert's z_T through KSamplerAdvanced (noise off) on the SR-attention
    + map-recorder MODEL, and the target word's map as an image."""
    from realedit.testbed.demo_inputs import tiny_run

    workflow, photos, family = tiny_run(json.loads(SR_KSAMPLER.read_text()), size=SIZE, steps=3)
    plain = copy.deepcopy(workflow)
    plain["14"]["inputs"]["model"] = ["1", 0]
    for node in ("17", "18", "19"):  # no recorder in the sampler's MODEL: no map to read (a clear error)
        del plain[node]
    result = runner.run_workflow(workflow, outputs=["14", "17"], overrides=photos, tiny_checkpoint=family,
                                 output_dir=tmp_path)
    edited, (mask,) = result["14"][0]["samples"], result["17"]
    assert edited.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(edited).all()
    assert mask.shape == (1, SIZE, SIZE) and 0.0 <= float(mask.min()) < 0.5 < float(mask.max()) <= 1.0  # min-max
    assert {name for name, ui in result.ui.items() if ui.get("images")} == {"16", "19"}
    unpatched = runner.run_workflow(plain, outputs=["14"], overrides=photos, tiny_checkpoint=family,
                                    output_dir=tmp_path)
    assert not torch.equal(unpatched["14"][0]["samples"], edited)  # SR-attention changed the edit


def _schema_inputs(node) -> dict:
    return {i.id: i for i in node.define_schema().inputs}


def test_edit_sampler_p2p_defaults_come_from_the_settings_and_name_their_origin(comfy):
    """self_replace defaults to the official SpecRef script's 0.6 (was 0.4), taken from P2PSettings."""
    from realedit.attention.settings import P2PSettings
    from realedit.nodes.specref import SpecRefEditSampler

    inputs = _schema_inputs(SpecRefEditSampler)
    assert inputs["self_replace"].default == P2PSettings().self_replace == 0.6
    assert "official SpecRef script" in inputs["self_replace"].tooltip
    assert inputs["cross_replace"].default == P2PSettings().cross_replace


def test_the_unconditional_sr_option_is_named_for_what_it_does(comfy):
    """It reuses the conditional reference K/V; it must not claim to be the official option (which pairs the
    unconditional rows with K/V from a CFG inversion of the reference)."""
    from realedit.nodes.specref import ApplySRAttention, SpecRefEditSampler

    for node in (ApplySRAttention, SpecRefEditSampler):
        inputs = _schema_inputs(node)
        assert "include_uncond" not in inputs and inputs["uncond_shared_kv"].default is False
        tooltip = inputs["uncond_shared_kv"].tooltip
        assert "same reference K/V" in tooltip and "Not the official code's" in tooltip and "cfg" in tooltip
