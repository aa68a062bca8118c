"""The command line: one module per `proco-ray` command, each its arguments (`add_arguments`) and its call (`run`).

Commands connect to Ray and hand the library what it needs; nothing below this package parses arguments.
"""

CHECKPOINT_HELP = "a checkpoint folder, or a run folder for its best checkpoint (local or s3://)"  # --checkpoint
