"""Run a Ray Tune experiment (hparams, ablation, baselines) on ISIC 2018 on the Ray cluster this job runs in.

    ray job submit --working-dir . -- python jobs/tune_isic.py --experiment ablation --data s3://BUCKET/prefix
    ray submit cluster.yaml jobs/tune_isic.py --experiment hparams --data s3://BUCKET/prefix

Rerunning the same command resumes an interrupted sweep (finished trials are not rerun).
"""

import sys

from proco_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", "--config", "isic2018.yaml", *sys.argv[1:]]))
