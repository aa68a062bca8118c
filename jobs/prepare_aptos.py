"""Prepare APTOS 2019 (train_images + train.csv) into Parquet shards in object storage: `proco-ray prepare --format aptos2019`.

ray submit cluster.yaml jobs/prepare_aptos.py SOURCE OUTPUT [--image-size 224 ...]
ray job submit --working-dir . -- python jobs/prepare_aptos.py SOURCE OUTPUT [--image-size 224 ...]
"""

import sys

from proco_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", "--format", "aptos2019", *sys.argv[1:]]))
