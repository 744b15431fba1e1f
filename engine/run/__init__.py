"""What a generation run keeps account of and tells the user: the ledger actor every stage reports to
(`ledger`), which failures a run survives by resuming and which stage one came from (`failures`),
errors.parquet / run.json / the console summary (`report`), and the gallery (`gallery`). The run itself is
`engine.pipeline`; its output and resume are `engine.output`."""
