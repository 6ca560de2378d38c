"""Full fine-tuning with params and optimizer state sharded (FSDP) over all devices.

    jft train --config configs/full_fsdp_llama.py --workdir runs/fsdp \
        --config.model.path=/path/to/Llama-3.1-8B --config.data.train=/path/to/train.jsonl

Each device holds about 1/N of every matrix and of its AdamW state; the batch's rows are
split over the same devices. Add tensor parallelism with --config.mesh.tensor=2 (heads, MLP
width and vocab split in two; mesh.fsdp=-1 then takes the remaining devices). On a TPU pod,
scripts/launch_tpu_pod.sh runs it on every host (see the README).
"""

from jft.config import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # required: a Hugging Face model folder
    # float32 master weights and Adam moments: at lr 1e-5 bf16 weights would round most updates
    # away. 12 bytes/param of state (+4 for the gradient), spread over the FSDP devices. For a memory-lean run:
    # --config.model.dtype=bfloat16 --config.optim.bf16_update=kahan (README, "Precision").
    c.model.dtype = "float32"
    c.model.compute_dtype = "bfloat16"  # matmuls and activations in bf16
    c.data.train = ""  # required: training records
    c.data.seq_len = 2048
    c.train.batch_size = 32  # rows per step, split over data x fsdp devices
    c.train.epochs = 2
    c.mesh.data = 1  # no pure data parallelism: every device is an FSDP shard
    c.mesh.fsdp = -1  # all devices
    c.mesh.tensor = 1
    c.optim.learning_rate = 1e-5
    c.train.checkpoint_dir = ""  # on a pod: gs://BUCKET/RUN, where every host writes its shards
    return c
