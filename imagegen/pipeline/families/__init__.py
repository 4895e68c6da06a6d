"""The model families we serve, looked up by the pipeline class a folder's ``model_index.json`` names."""

from imagegen.pipeline.families.base import Conditioning, FamilyDefaults, Guidance, ModelFamily, Placement
from imagegen.pipeline.families.flux import Flux
from imagegen.pipeline.families.sd import StableDiffusion
from imagegen.pipeline.families.sd3 import StableDiffusion3
from imagegen.pipeline.families.sdxl import StableDiffusionXL

FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)


def family_for(pipeline_class: str) -> type[ModelFamily]:
    for family in FAMILIES:
        if pipeline_class in family.pipelines:
            return family
    known = sorted(p for f in FAMILIES for p in f.pipelines)
    raise ValueError(f"pipeline {pipeline_class!r} is not served; supported: {', '.join(known)}")


__all__ = ["FAMILIES", "Conditioning", "FamilyDefaults", "Guidance", "ModelFamily", "Placement", "family_for"]
