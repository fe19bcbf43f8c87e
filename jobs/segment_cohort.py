"""Ray Jobs entrypoint for the cohort job (same as `zeus run`):

    ray job submit --working-dir . -- python jobs/segment_cohort.py configs/ai4skin-conch.yaml \
        --set input.manifest=s3://bucket/cohort.csv --set output.root=s3://bucket/results

Inside a Ray job RAY_ADDRESS is set, so the job attaches to the cluster instead of starting Ray.
"""
import sys

from zeus_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
