import sys

from proco_ray.cli import main

sys.exit(main())
