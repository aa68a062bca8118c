"""Predict new images with a trained checkpoint on the Ray cluster this job runs in (or a local one).

ray submit cluster.yaml jobs/predict.py --checkpoint s3://RUNS/name/checkpoint_... --input s3://BUCKET/new-images \
    --output s3://BUCKET/predictions
ray job submit --working-dir . -- python jobs/predict.py --checkpoint ... --input ... --output ...
"""

import sys

from proco_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
