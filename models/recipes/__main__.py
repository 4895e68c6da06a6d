"""``python -m models.recipes <stage>``: the whole recipe of the embedded default models, resumable.

``all`` runs the stages in order; each one skips what is already done under runs/ and resumes an
interrupted run from its last checkpoint. ``eval-edits`` (background replacement through /v1/images/edits, after
``classifier``) runs only when named.
"""

from __future__ import annotations

import argparse
import os

import torch

from models.recipes.common import build_split, log, timed

TRAIN_COUNT = 30000
STAGES = ["data", "vae", "unet", "distill", "export", "flow", "classifier", "eval"]
EXTRA_STAGES = ["eval-edits"]  # not part of ``all``


def run_stage(stage: str, quick: bool) -> None:
    if stage == "data":
        build_split("train", 0, TRAIN_COUNT)
        build_split("val", 0, 512)
    elif stage == "vae":
        from models.recipes import vae

        vae.run(TRAIN_COUNT)
    elif stage == "unet":
        from models.recipes import unet

        unet.run(TRAIN_COUNT)
    elif stage == "distill":
        from models.recipes import distill

        distill.run(TRAIN_COUNT)
    elif stage == "export":
        from models.recipes import export

        export.export_teacher()
        export.export_student()
    elif stage == "flow":  # after export: it trains on the shipped VAE's latents
        from models.recipes import export, flow

        flow.run(TRAIN_COUNT)
        export.export_flow()
    elif stage == "classifier":
        from models.recipes import classifier

        classifier.run(TRAIN_COUNT)
    elif stage == "eval":
        from models.recipes import evaluate

        evaluate.run(TRAIN_COUNT, quick=quick)
    elif stage == "eval-edits":
        from models.recipes import evaluate_edits

        evaluate_edits.run(TRAIN_COUNT)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m models.recipes")
    parser.add_argument("stages", nargs="+", choices=[*STAGES, *EXTRA_STAGES, "all"])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("IMAGEGEN_RECIPE_THREADS", "2")))
    parser.add_argument("--quick", action="store_true", help="eval: a tenth of the prompts, four configs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds: dict[str, float] = {}
    for stage in STAGES if "all" in args.stages else args.stages:
        log(f"== stage {stage}")
        with timed(stage, seconds):
            run_stage(stage, args.quick)
        log(f"== stage {stage}: {seconds[stage] / 60:.1f} min")
    log(f"== done in {sum(seconds.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
