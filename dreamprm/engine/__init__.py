"""Everything that touches DeepSpeed, and the only package that imports it.

core.py: the process group's creation and teardown, the engine around the PRM (with the accessors bilevel.py reads)
and the inner update; checkpoint_io.py: checkpoints written, verified, converted and loaded through
the engine. The bilevel step itself is dreamprm/bilevel.py, the collectives dreamprm/dist.py.
"""

# core first: it picks DeepSpeed's accelerator before deepspeed is first imported
from dreamprm.engine.core import (Engine, check_finite_diff_dtype, close_distributed, create_engine, ds_config,
                                  init_distributed, inner_update, lr_lambda, to_device)
from dreamprm.engine.checkpoint_io import (consolidated_state_dict, load_checkpoint, save_checkpoint,
                                           universal_copy, verify_on_every_rank)

__all__ = ["Engine", "check_finite_diff_dtype", "close_distributed", "consolidated_state_dict", "create_engine",
           "ds_config", "init_distributed", "inner_update", "load_checkpoint", "lr_lambda", "save_checkpoint",
           "to_device", "universal_copy", "verify_on_every_rank"]
