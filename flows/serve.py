"""Register the pipeline as a deployment and serve it, so runs can be triggered from the Prefect UI.

    prefect server start --host 127.0.0.1          # terminal 1: the API and UI on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                          # terminal 2: registers `debias-pipeline/default` and waits

Then open the UI, Deployments → debias-pipeline/default → Run → Custom run: the form shows the flow's
parameters (methods as a choice, params overrides, project_dir), or from a shell:

    prefect deployment run debias-pipeline/default --param 'methods=["baseline"]' \\
        --param 'overrides={"sample.guidance_scale": 2}'

Runs execute on this machine, in the checkout given by --project-dir here. The deployment freezes
project_dir to it: the server refuses a run that names another directory, so whoever can reach the Prefect
API cannot point a run at some other DVC project's commands (docs/flows.md).
"""

import argparse
import sys

from prefect.utilities.annotations import freeze

from flows.pipeline import debias_pipeline, project_root
from pipeline.errors import UserError


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="default")
    ap.add_argument("--project-dir", default=".")
    args = ap.parse_args(argv)
    try:
        root = project_root(args.project_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    debias_pipeline.serve(name=args.name, parameters={"project_dir": freeze(str(root))}, tags=["debias"],
                          description="Coloured-MNIST bias pipeline (dvc.yaml stages as tasks)")


if __name__ == "__main__":
    main()
