"""Register the pipeline as a deployment and serve it, so runs can be triggered from the Prefect UI.

    prefect server start --host 127.0.0.1          # terminal 1: the API and UI on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                          # terminal 2: registers `debias-pipeline/default` and waits

Then open the UI, Deployments → debias-pipeline/default → Run → Custom run: the form shows the typed
parameters (params overrides, methods). Runs execute in this process, in this checkout.
"""

import argparse
from pathlib import Path

from flows.pipeline import PipelineConfig, debias_pipeline


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="default")
    ap.add_argument("--project-dir", default=".")
    args = ap.parse_args(argv)
    config = PipelineConfig(project_dir=str(Path(args.project_dir).resolve()))
    debias_pipeline.serve(name=args.name, parameters={"config": config.model_dump()},
                          tags=["debias"], description="Coloured-MNIST bias pipeline (dvc.yaml stages as tasks)")


if __name__ == "__main__":
    main()
