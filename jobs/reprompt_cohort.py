"""Ray Jobs entrypoint for `zeus reprompt` (new prompts on stored embeddings, no slide read):

    ray job submit --working-dir . -- python jobs/reprompt_cohort.py \
        --results s3://bucket/results --prompts prompts/metastasis.yaml
"""
import sys

from zeus_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["reprompt", *sys.argv[1:]]))
