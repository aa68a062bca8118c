"""Prepare ISIC 2018 Task 3 into Parquet shards in object storage: `proco-ray prepare --format isic2018`.

ray submit cluster.yaml jobs/prepare_isic.py SOURCE OUTPUT [--image-size 224 ...]
ray job submit --working-dir . -- python jobs/prepare_isic.py SOURCE OUTPUT [--image-size 224 ...]
"""

import sys

from proco_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", "--format", "isic2018", *sys.argv[1:]]))
