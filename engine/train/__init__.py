"""Training on generated shards with Ray Train: what `jobs.train` (and the fine-tuning jobs) are built from.

- `config`: the typed configs of a training run and of a sweep.
- `sources`: the shard files of each data path, validated up front, and the generation run and dataset
  each belongs to (paths of two datasets are refused).
- `data`: the shards' row index (pyarrow, no images), the sampling plan, and the Ray Datasets the workers
  iterate (decode + augment in `map_batches`).
- `mixing`: the utilization strategies (which train rows an epoch sees), pure seedable functions.
- `evaluation`: classification metrics and the figures (curves PNG, the sweep's bars).
- `sweep_report`: a sweep's rows, summary over seeds, paired comparison with a baseline, its tables and files.
- `loop`: what runs in each Ray Train worker (model and optimizer builders, the per-worker loop, checkpoint
  files).
- `runner`: the driver's side of Ray Train (start Ray, check the reservation, the run folder, fit).

Importing this package or any of its modules loads no torch: workers import it inside the loop.
"""
