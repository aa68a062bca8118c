"""Train ProCo on a prepared APTOS dataset on the Ray cluster this job runs in (or a local one).

ray submit cluster.yaml jobs/train_aptos.py --data s3://BUCKET/prefix [section.key=value ...]
ray job submit --working-dir . -- python jobs/train_aptos.py --data s3://BUCKET/prefix
"""

import sys

from proco_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--config", "aptos2019.yaml", *sys.argv[1:]]))
