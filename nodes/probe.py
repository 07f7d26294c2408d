"""RealEdit Attention Probe: a pass-through hook on every attention layer, and its report."""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..attention.probe import ProbeHook
from ..hosts.comfy import install_hook

Probe = io.Custom("REALEDIT_PROBE")
CATEGORY = "RealEdit/debug"


class AttentionProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditAttentionProbe",
            display_name="RealEdit Attention Probe",
            category=CATEGORY,
            description=(
                "Installs a pass-through hook on every self- and cross-attention layer of a clone of the "
                "model and records which layers, token grids, heads, steps and cond/uncond rows it sees. "
                "Sampling output is unchanged. Feed PROBE to 'RealEdit Probe Report' after the sampler."
            ),
            inputs=[io.Model.Input("model", tooltip="Any SD1.x, SD2.x or SDXL model (other patches are kept).")],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The probed clone; the input model is untouched."),
                Probe.Output(display_name="probe"),
            ],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        hook = ProbeHook()
        return io.NodeOutput(install_hook(model, hook), hook)


class ProbeReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditProbeReport",
            display_name="RealEdit Probe Report",
            category=CATEGORY,
            description="Text summary of what an Attention Probe recorded during the last sampling run.",
            inputs=[
                Probe.Input("probe"),
                io.Latent.Input(
                    "after", tooltip="Connect the sampler's output so the report runs after sampling."
                ),
            ],
            outputs=[io.String.Output(display_name="summary")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, probe, after) -> float:
        return float("nan")  # the records change with every run; never serve a cached report

    @classmethod
    def execute(cls, probe: ProbeHook, after) -> io.NodeOutput:
        text = probe.summary()
        return io.NodeOutput(text, ui=ui.PreviewText(text))
