"""`modification convert`: a Llama/Mistral/Qwen2/Qwen3 checkpoint becomes a MoD checkpoint (`convert_checkpoint`).
The routing flags are `MoDConfig`'s routing fields; in a `--config` file they go under `routing:`."""

from __future__ import annotations

from modification.conversion.settings import ConvertSettings

HELP = "convert a Llama/Mistral/Qwen2/Qwen3 checkpoint into a MoD checkpoint"
SETTINGS = ConvertSettings


def run(settings: ConvertSettings) -> None:
    from modification.conversion.convert import convert_checkpoint

    print(f"wrote MoD checkpoint to {convert_checkpoint(settings)}")
