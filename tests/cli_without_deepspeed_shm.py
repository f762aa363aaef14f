"""`python -m tests.cli_without_deepspeed_shm ARGS`: `chatglm-sft ARGS`, with DeepSpeed's shared-memory all-reduce
left unbuilt.

On a CPU, DeepSpeed compiles that op with ninja the first time a process group starts, and again in every new virtual
environment: about 75 s of both of a 2-core machine's cores in each CI run, for tests that compare our numbers under
ZeRO with one process's and do not depend on how DeepSpeed sums them (gloo does it then, as under DDP and FSDP).
Users' runs keep DeepSpeed's own behaviour; only the sharded-training tests launch through here."""

from __future__ import annotations

import sys

import deepspeed.ops

from chatglm_sft.cli import main

if __name__ == "__main__":
    # DeepSpeed's TorchBackend builds the op only when this table calls it compatible.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    sys.exit(main())
