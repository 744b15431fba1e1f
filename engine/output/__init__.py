"""Exactly-once output and resume: the one place that explains both.

A run writes `<out>/data/part-*.parquet` shards, `manifest.json`, `config.yaml`, then `errors.parquet`,
`run.json`, a dataset card and a gallery at the end (`engine.pipeline`). What makes a killed, preempted or
retuned run resume without losing or duplicating a row:

1. **A row's identity.** `schema.row_id(source_id, recipe, variant, config_hash)`: deterministic. The hash
   covers what determines the rows (recipe, seeds, K, data, models and revisions, generation settings) and
   leaves out how the run is scheduled or stored (fields declared with `scheduling_field` in
   `engine.config`: batch sizes, concurrency, resources, devices, `data.rows_per_block`, `output`, `ray`).
2. **The run's identity** (`resume.resume_identity`). A new output takes the config's hash. An output that
   holds shards keeps the hash it was started with, if the content is unchanged (`manifest.json` stores the
   content, `resume.run_manifest`); other content is refused with the changed keys (`seed: 0 -> 1`) unless
   `output.overwrite: true`. So a run retuned for another cluster resumes; a different run never mixes in.
3. **Atomic shards** (`shards`). Each batch is one shard named by a hash of its ids, written under a hidden
   temporary name and renamed (one put on object stores): a shard is complete or absent, and a retried
   batch rewrites the same file. Shards are found by listing `data/`; the manifest is written twice per run.
4. **What a rerun reads** (`resume.prepare_output`, `written_ids`). Temporaries of a killed run are removed;
   the ids already written are sorted once by a Ray task into the object store, and every task looks its
   batch up there by binary search (the driver holds a reference, not the ids).
5. **What a rerun skips.** The recipe opening (`engine.stages.opening`) drops, before anything is read or
   decoded, every source whose expected ids (`engine.stages.expand.Expansion`) are all written; an image
   folder's bytes are read only after that (`read_bytes`), so a resumed run reads only the files it still
   owes rows for. `expand` then drops the single rows already written.
6. **Retries** (`engine.run.failures`). A loss of Ray workers that the actor pools' own retries cannot
   cover starts the dataset again from the shards, `ray.max_run_attempts` times; each attempt is a resume.
"""
