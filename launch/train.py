"""Train a PRM with bilevel instance reweighting.

    python launch/train.py                                   # built-in demo, one process
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --output_dir runs/demo-zero3
    torchrun --nproc_per_node 8 launch/train.py --config recipes/minif2f.yaml --deepspeed ds_configs/zero3.json
    python launch/train.py --help                            # every option

All logic lives in dreamprm.train; this file only parses the config and calls it.
"""

import sys

from dreamprm.cli import train

if __name__ == "__main__":
    sys.exit(train(sys.argv[1:]))
