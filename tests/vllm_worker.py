"""Serve a merged export with vLLM's Python API: run by tests/test_vllm.py with the vLLM venv's Python.

    python tests/vllm_worker.py EXPORT_DIR RECORDS_JSON OUT_JSON

RECORDS_JSON holds [{"id", "question", "steps"}]. Runs where dreamprm is not installed (the venv of
tests/vllm_env.sh has its own transformers): each input is built by the prm_input function of the
export's own README.md (its first python block, executed), as a user would copy it. OUT_JSON gets
{"ids": {id: token ids}, "pooler_config": {id: scores}, "per_request": {id: scores},
"no_step_tag_id": {id: rows returned}, "dtype": vLLM's dtype, "cli_step_tag_id": what the card's
`vllm serve` flags parse to}.
"""

import gc
import json
import re
import shlex
import sys

from vllm import LLM, PoolingParams
from vllm.config import PoolerConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

# This machine only: no torch.compile warm-up (about a minute; the same kernels run eagerly), one process
# (with VLLM_ENABLE_V1_MULTIPROCESSING=0 from the caller) and 10% of memory reserved, not 92%.
SMALL = {"enforce_eager": True, "distributed_executor_backend": "uni", "gpu_memory_utilization": 0.1}


def scores(llm, prompts, params=None):
    outs = llm.encode(prompts, pooling_params=params, pooling_task="token_classify", use_tqdm=False)
    return [o.outputs.data for o in outs]


def main(model: str, records_file: str, out_file: str) -> None:
    card = open(f"{model}/README.md").read()
    conf = json.load(open(f"{model}/config.json"))
    tid, dtype = conf["dreamprm_step_tag_id"], conf["dtype"]
    ns: dict = {}
    exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), ns)  # the card's input recipe
    records = json.load(open(records_file))
    ids = {r["id"]: ns["prm_input"](r["question"], r["steps"]) for r in records}
    prompts = [{"prompt_token_ids": v} for v in ids.values()]
    out = {"ids": ids}

    llm = LLM(model=model, runner="pooling", dtype=dtype, pooler_config=PoolerConfig(step_tag_id=tid), **SMALL)
    out["dtype"] = str(llm.llm_engine.model_config.dtype)
    out["pooler_config"] = dict(zip(ids, (d[:, 1].tolist() for d in scores(llm, prompts))))
    del llm
    gc.collect()

    llm = LLM(model=model, runner="pooling", dtype=dtype, **SMALL)  # the pitfall: no step_tag_id anywhere
    out["no_step_tag_id"] = dict(zip(ids, (d.shape[0] for d in scores(llm, prompts))))
    per_request = scores(llm, prompts, PoolingParams(step_tag_id=tid))
    out["per_request"] = dict(zip(ids, (d[:, 1].tolist() for d in per_request)))

    serve = shlex.split(re.search(r"`vllm serve (.*?)`", card).group(1))
    args = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", *serve])
    out["cli_step_tag_id"] = EngineArgs.from_cli_args(args).pooler_config.step_tag_id
    with open(out_file, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":  # vLLM's engine may spawn processes that re-import this file
    main(*sys.argv[1:])
