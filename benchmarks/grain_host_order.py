"""Does Grain's per-host sharding keep the global batches of a run independent of the host count?

    pip install grain==0.2.18 && python benchmarks/grain_host_order.py

jft needs it to (a run resumed on another number of hosts must see the same batches), so it reads
per host as :func:`jft.sharding.host_rows` says: every host computes the one seeded global order
and takes its rows of each batch. Grain's ``IndexSampler`` with ``ShardOptions`` instead gives
each host a disjoint shard of the records to shuffle on its own; this prints the first global
batch of 64 records in batches of 8 on 1 host and on 2 simulated hosts (4 rows each), and whether
all of them agree. With grain 0.2.18 they do not, which is why jft does not use Grain's sampler.
"""

import grain
import numpy as np

RECORDS, BATCH = 64, 8


def batches(shard_index: int, shard_count: int) -> list[list[int]]:
    sampler = grain.samplers.IndexSampler(
        num_records=RECORDS,
        shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True),
        shuffle=True,
        num_epochs=1,
        seed=0,
    )
    batch = grain.transforms.Batch(BATCH // shard_count)
    loader = grain.DataLoader(data_source=list(range(RECORDS)), sampler=sampler, operations=[batch], worker_count=0)
    return [np.asarray(b).tolist() for b in loader]


one = [sorted(b) for b in batches(0, 1)]
two = [sorted(a + b) for a, b in zip(batches(0, 2), batches(1, 2), strict=True)]
print("1 host, global batch 0: ", one[0])
print("2 hosts, global batch 0:", two[0])
print("the same global batches on 1 and 2 hosts:", one == two)
