"""Ray job: prepare APTOS 2019 (train_images + train.csv) into Parquet shards in object storage.

    ray job submit --working-dir . -- python jobs/prepare_aptos.py SOURCE OUTPUT [--image-size 224 ...]

The same options as `proco-ray prepare`, with the source format fixed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proco_ray.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], kind="aptos2019"))
