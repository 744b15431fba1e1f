"""What a recipe strings together that is not a model: the `Stage` and the one loop that applies stages
(`loop`), the batch helpers every stage uses (`batch`), the CPU stage functions (`decode`, `expand`,
`encode`; `engine.recipes.opening` strings skip_done, read_bytes and decode together for every recipe), class
pools that stages draw other rows of a class from (`class_pools`), and the vLLM stage kind served
through `ray.data.llm` (`llm`)."""
